# The project's Airflow image: the official Airflow 3.3.2 image with airflow-dicom-ingest and its
# vendor sandbox installed. docker-compose.yaml builds it from the repository root.
FROM apache/airflow:3.3.2

# Only what the package build needs; dags/, plugins/ and include/ are mounted at run time.
COPY --chown=airflow:0 pyproject.toml README.md /opt/airflow-dicom-ingest/
COPY --chown=airflow:0 plugins/dicom_ingest /opt/airflow-dicom-ingest/plugins/dicom_ingest
COPY --chown=airflow:0 sandbox/dicom_ingest_sandbox /opt/airflow-dicom-ingest/sandbox/dicom_ingest_sandbox

# Installing the project must never move Airflow: pin it, as the image's documentation asks, and
# resolve the rest against the constraints of this Airflow release.
RUN pip install --no-cache-dir \
      --constraint "https://raw.githubusercontent.com/apache/airflow/constraints-${AIRFLOW_VERSION}/constraints-${PYTHON_MAJOR_MINOR_VERSION}.txt" \
      "apache-airflow==${AIRFLOW_VERSION}" \
      "/opt/airflow-dicom-ingest[sandbox]" \
 && mkdir -p /opt/airflow/dicom_ingest /opt/airflow/demo /opt/airflow/sandbox-data
