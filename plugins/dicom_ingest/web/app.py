"""The plugin's FastAPI app, mounted by Airflow's API server at ``/dicom-ingest``.

Pages (HTML) and their JSON twins under ``/api``:

- ``/``: the sites the user may read;
- ``/sites/{site_id}`` and ``/api/sites/{site_id}``: a site's counts over every run;
- ``/runs/{dag_id}/{run_id}/batches/{batch_id}`` and ``/api/runs/...``: one batch's studies with
  their state, order, the vendor's status, the reason and abandoned orders (the extra link of the
  upload and order-sensor tasks opens this page).

Every route needs a signed-in Airflow user (the UI's ``_token`` cookie, which the nav entry's
iframe sends, or a bearer token); the site and batch routes also need read access to the site's
DAG runs, checked by Airflow's auth manager. They show UIDs, states, reasons and counts only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.templating import Jinja2Templates

from dicom_ingest.links import api_root_path
from dicom_ingest.sites import SiteConfig, SitesFileError
from dicom_ingest.sites.config import DAG_ID_PREFIX
from dicom_ingest.web.data import (
    LedgerUnavailableError,
    SiteNotFoundError,
    batch_view,
    find_site,
    list_sites,
    site_id_of_dag,
    site_view,
)

TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")
RUN_ACCESS = "GET"

read_runs_of_path_dag = requires_access_dag(RUN_ACCESS, DagAccessEntity.RUN)
"""Allow users who may read the runs of the DAG named by the ``dag_id`` path parameter."""


def may_read_runs(request: Request, user: BaseUser, dag_id: str) -> bool:
    """Tell whether the user may read the runs of a DAG, as Airflow's auth manager decides.

    :param request: the request.
    :param user: the signed-in user.
    :param dag_id: the DAG.
    """
    try:
        requires_access_dag(RUN_ACCESS, DagAccessEntity.RUN, dag_id)(request, user)
    except HTTPException as exc:
        if exc.status_code == status.HTTP_403_FORBIDDEN:
            return False
        raise
    return True


def readable_site(site_id: str, request: Request, user: GetUserDep) -> SiteConfig:
    """Return the site of the ``site_id`` path parameter if the user may read its DAG's runs.

    :param site_id: the site's id.
    :param request: the request.
    :param user: the signed-in user.
    """
    if not may_read_runs(request, user, f"{DAG_ID_PREFIX}{site_id}"):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Forbidden")
    return find_site(site_id)


def site_of_dag(dag_id: str) -> SiteConfig:
    """Return the site whose DAG is the ``dag_id`` path parameter.

    :param dag_id: the site's DAG id.
    """
    return find_site(site_id_of_dag(dag_id))


ReadableSite = Annotated[SiteConfig, Depends(readable_site)]
SiteOfDag = Annotated[SiteConfig, Depends(site_of_dag)]

router = APIRouter()


def _page(request: Request, template: str, view: dict[str, Any]) -> HTMLResponse:
    """Render a page with the view and the Airflow UI's root path (for links into the UI).

    :param request: the request.
    :param template: the template's file name.
    :param view: what the page shows.
    """
    return TEMPLATES.TemplateResponse(request, template, {"view": view, "airflow_root": api_root_path()})


@router.get("/", response_class=HTMLResponse, name="index")
def index(request: Request, user: GetUserDep) -> HTMLResponse:
    """List the sites of the sites file whose DAG runs the user may read."""
    listing = list_sites()
    sites = [
        {"site_id": site_id, "dag_id": dag_id, "enabled": enabled}
        for site_id, dag_id, enabled in listing.sites
        if may_read_runs(request, user, dag_id)
    ]
    return _page(request, "index.html", {"sites": sites, "invalid_entries": listing.invalid_entries})


@router.get("/api/sites/{site_id}", name="site_json")
def site_json(site: ReadableSite) -> dict[str, Any]:
    """Return a site's counts over every run."""
    return site_view(site)


@router.get("/sites/{site_id}", response_class=HTMLResponse, name="site_page")
def site_page(request: Request, site: ReadableSite) -> HTMLResponse:
    """Show a site's counts over every run."""
    return _page(request, "site.html", site_view(site))


@router.get(
    "/api/runs/{dag_id}/{run_id}/batches/{batch_id}",
    dependencies=[Depends(read_runs_of_path_dag)],
    name="batch_json",
)
def batch_json(site: SiteOfDag, run_id: str, batch_id: str) -> dict[str, Any]:
    """Return one batch's studies with their orders."""
    return batch_view(site, run_id, batch_id)


@router.get(
    "/runs/{dag_id}/{run_id}/batches/{batch_id}",
    response_class=HTMLResponse,
    dependencies=[Depends(read_runs_of_path_dag)],
    name="batch_page",
)
def batch_page(request: Request, site: SiteOfDag, run_id: str, batch_id: str) -> HTMLResponse:
    """Show one batch's studies with their orders."""
    return _page(request, "batch.html", batch_view(site, run_id, batch_id))


def _not_found(_request: Request, exc: Exception) -> JSONResponse:
    """Answer 404 for an unknown site or a DAG that is not a site's."""
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_404_NOT_FOUND)


def _unavailable(_request: Request, exc: Exception) -> JSONResponse:
    """Answer 503 when the sites file or a ledger cannot be read (the text names no path)."""
    detail = str(exc) if isinstance(exc, LedgerUnavailableError) else "the sites file cannot be read"
    return JSONResponse({"detail": detail}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)


def create_app() -> FastAPI:
    """Build the plugin's app (Airflow mounts it at ``/dicom-ingest``)."""
    app = FastAPI(
        title="DICOM ingest",
        description="Sites, batches and vendor orders of the DICOM ingestion.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.include_router(router)
    app.add_exception_handler(SiteNotFoundError, _not_found)
    app.add_exception_handler(LedgerUnavailableError, _unavailable)
    app.add_exception_handler(SitesFileError, _unavailable)
    return app


app = create_app()
"""The app the plugin registers."""
