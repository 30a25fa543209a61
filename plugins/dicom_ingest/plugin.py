"""The Airflow plugin of the DICOM ingest library.

The ``dicom_ingest`` connection type is registered through the provider entry point
(:mod:`dicom_ingest.provider_info`), since Airflow 3 plugins cannot add hooks; the plugin adds
the web pages (a FastAPI app in the API server, with an entry in the UI's Browse menu) and
declares the operators' extra link.
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

from dicom_ingest.links import WEB_URL_PREFIX, DicomBatchOrdersLink

WEB_APP_NAME = "DICOM ingest"


class DicomIngestPlugin(AirflowPlugin):
    """Register the DICOM ingest library with Airflow.

    ``operator_extra_links`` lists :class:`~dicom_ingest.links.DicomBatchOrdersLink` without
    claiming any operator class: in Airflow 3.3 the API server serves an operator's links from
    the XComs the worker wrote (see :mod:`dicom_ingest.links`), and a plugin link that claimed an
    operator would replace that with a ``get_link`` call in the API server, outside any task.
    """

    name = "dicom_ingest"
    operator_extra_links = [DicomBatchOrdersLink()]
    external_views = [
        {
            "name": WEB_APP_NAME,
            "href": f"{WEB_URL_PREFIX}/",
            "url_route": "dicom_ingest",
            "destination": "nav",
            "category": "browse",
        }
    ]

    @property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """Return the web app, imported only where it is asked for (the API server), not in workers."""
        from dicom_ingest.web.app import app

        return [{"app": app, "url_prefix": WEB_URL_PREFIX, "name": WEB_APP_NAME}]
