"""Read ``sites.yaml`` into validated site configurations, one entry at a time.

Which file is read (:func:`sites_file_path`):

1. ``$DICOM_INGEST_SITES_FILE`` when set (a relative value is relative to the working directory);
2. else the ``default`` the caller passes; the site DAG file passes ``include/sites.yaml`` of the
   project it belongs to;
3. else ``include/sites.yaml`` beside the DAGs folder: the parent of ``$AIRFLOW__CORE__DAGS_FOLDER``,
   or ``$AIRFLOW_HOME`` (``~/airflow``) when that variable is unset. This is the project root in
   the Airflow image (``/opt/airflow``) and in a checkout of this repository.

Each entry of the ``sites:`` list is validated on its own: a bad entry becomes a
:class:`SiteError` naming the file, the line, the site (or its position when it has no id) and
the field, while the good entries are still returned. Only a file that cannot be used at all
(missing, not YAML, not a mapping with a ``sites:`` list) raises :class:`SitesFileError`.

Loading is pure: it reads one file and touches no network, database or Airflow Variable, and
this module imports only pydantic and PyYAML, so DAG files may call it while being parsed.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from dicom_ingest.exceptions import DicomIngestConfigError
from dicom_ingest.sites.config import SiteConfig, repeated_ids, unknown_top_level_keys
from dicom_ingest.sites.locations import airflow_home

SITES_FILE_ENV = "DICOM_INGEST_SITES_FILE"
DAGS_FOLDER_ENV = "AIRFLOW__CORE__DAGS_FOLDER"
SITES_KEY = "sites"


class SitesFileError(DicomIngestConfigError):
    """The sites file as a whole cannot be used: missing, unreadable, not YAML, or of the wrong shape."""


@dataclass(frozen=True)
class SiteIssue:
    """One problem in one entry of the sites file.

    :param field: dotted path of the offending key (``metadata.manifest_key``); empty for the
        entry as a whole.
    :param message: what is wrong, without the offending value when it could be private.
    :param line: 1-based line of the key (or of the entry when the key is missing).
    """

    field: str
    message: str
    line: int


@dataclass(frozen=True)
class SiteError:
    """An entry of the sites file that was rejected, with every problem found in it.

    :param path: the sites file.
    :param index: 0-based position of the entry in the ``sites:`` list.
    :param site_id: the entry's ``id`` as written, if it is a string.
    :param line: 1-based line where the entry starts.
    :param issues: the problems, by line.
    """

    path: Path
    index: int
    site_id: str | None
    line: int
    issues: tuple[SiteIssue, ...]

    @property
    def label(self) -> str:
        """Name the entry: its id and position, or its position alone."""
        position = f"{SITES_KEY}[{self.index}]"
        return f"site {self.site_id!r} ({position})" if self.site_id else position

    def __str__(self) -> str:
        """Return one ``file:line: site: field: message`` line per problem."""
        return "\n".join(
            f"{self.path}:{issue.line}: {self.label}: {issue.field or 'entry'}: {issue.message}"
            for issue in self.issues
        )


@dataclass(frozen=True)
class SitesLoadResult:
    """What :func:`load_sites` found: the valid sites and the rejected entries.

    :param path: the file that was read.
    :param sites: the valid sites, in file order.
    :param errors: the rejected entries, in file order.
    """

    path: Path
    sites: tuple[SiteConfig, ...]
    errors: tuple[SiteError, ...]

    @property
    def enabled_sites(self) -> tuple[SiteConfig, ...]:
        """Return the valid sites that get a DAG."""
        return tuple(site for site in self.sites if site.enabled)

    def error_report(self) -> str:
        """Return every problem of every rejected entry, one per line."""
        return "\n".join(str(error) for error in self.errors)


def default_sites_path(environ: Mapping[str, str] | None = None) -> Path:
    """Return ``include/sites.yaml`` beside the DAGs folder.

    :param environ: the variables to use; the process environment when omitted.
    """
    variables = os.environ if environ is None else environ
    configured = variables.get(DAGS_FOLDER_ENV)
    dags_folder = Path(configured).expanduser() if configured else airflow_home(variables) / "dags"
    return dags_folder.parent / "include" / "sites.yaml"


def sites_file_path(
    default: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    """Return the sites file to read: ``$DICOM_INGEST_SITES_FILE``, else ``default``, else the project's.

    :param default: the file to read when the environment variable is unset.
    :param environ: the variables to use; the process environment when omitted.
    """
    variables = os.environ if environ is None else environ
    configured = variables.get(SITES_FILE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(default) if default is not None else default_sites_path(variables)


def load_sites(path: str | os.PathLike[str] | None = None) -> SitesLoadResult:
    """Read and validate a sites file, keeping every valid entry.

    :param path: the file to read; :func:`sites_file_path` decides when omitted.
    :raises SitesFileError: the file is missing, unreadable, not YAML or has no ``sites:`` list.
    """
    sites_path = Path(path) if path is not None else sites_file_path()
    document = _SitesDocument.parse(sites_path)
    entry_nodes, entries = document.entries()
    ids = [_raw_id(entry) for entry in entries]
    repeated = repeated_ids(site_id for site_id in ids if site_id is not None)
    sites: list[SiteConfig] = []
    errors: list[SiteError] = []
    for index, (node, entry) in enumerate(zip(entry_nodes, entries, strict=True)):
        issues = document.duplicate_key_issues(node)
        if ids[index] in repeated:
            issues.append(_repeated_id_issue(index, ids, entry_nodes))
        site = None
        if not isinstance(entry, dict):
            issues.append(SiteIssue("", "an entry must be a mapping of settings", _line(node)))
        else:
            try:
                site = SiteConfig.model_validate(entry)
            except ValidationError as exc:
                issues.extend(_issue_from_pydantic(error, node) for error in exc.errors(include_url=False))
        if issues or site is None:
            ordered = tuple(sorted(issues, key=lambda issue: issue.line))
            errors.append(SiteError(sites_path, index, ids[index], _line(node), ordered))
        else:
            sites.append(site)
    return SitesLoadResult(sites_path, tuple(sites), tuple(errors))


class _SitesYamlLoader(yaml.SafeLoader):
    """A safe loader that records repeated keys and leaves impossible dates to entry validation.

    Plain ``yaml.safe_load`` keeps the last of two equal keys without a word and raises a bare
    ``ValueError`` (no line, whole file lost) on a date such as ``2025-02-30``.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicate_keys: list[yaml.ScalarNode] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """Construct the mapping after noting its repeated keys (merged ``<<`` keys excepted)."""
        seen: set[str] = set()
        for key_node, _value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in seen:
                self.duplicate_keys.append(key_node)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_timestamp(self, node: yaml.ScalarNode) -> Any:
        """Keep an impossible date such as ``2025-02-30`` as text, for its entry's validation to report."""
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError:
            return self.construct_scalar(node)


_SitesYamlLoader.add_constructor("tag:yaml.org,2002:timestamp", _SitesYamlLoader.construct_yaml_timestamp)


@dataclass
class _SitesDocument:
    """A parsed sites file: its constructed data and the YAML nodes that locate every value."""

    path: Path
    root: yaml.Node | None
    data: Any
    duplicate_keys: list[yaml.ScalarNode]

    @classmethod
    def parse(cls, path: Path) -> _SitesDocument:
        """Read and parse ``path``, turning every failure into one :class:`SitesFileError`.

        :param path: the sites file.
        """
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise SitesFileError(
                f"{path}: sites file not found (set {SITES_FILE_ENV} to use another)"
            ) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise SitesFileError(f"{path}: cannot read the sites file: {exc}") from exc
        loader = _SitesYamlLoader(text)
        try:
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        except yaml.MarkedYAMLError as exc:
            raise SitesFileError(f"{path}:{_describe_yaml_error(exc)}") from exc
        except yaml.YAMLError as exc:
            raise SitesFileError(f"{path}: invalid YAML: {exc}") from exc
        finally:
            loader.dispose()
        return cls(path, root, data, loader.duplicate_keys)

    def entries(self) -> tuple[list[yaml.Node], list[Any]]:
        """Return the nodes and values of the ``sites:`` entries, checking the file's shape.

        :raises SitesFileError: the file is not a mapping with a ``sites:`` list, has unknown
            top-level keys, or repeats a key outside any entry.
        """
        if not isinstance(self.data, dict) or not isinstance(self.root, yaml.MappingNode):
            line = _line(self.root) if self.root is not None else 1
            raise self._error(line, f"expected a mapping with a top-level '{SITES_KEY}:' list")
        unknown = unknown_top_level_keys(self.data)
        if unknown:
            raise self._error(
                _line_of(self.root, (unknown[0],)),
                f"unknown top-level key {unknown[0]!r}; "
                f"only '{SITES_KEY}' and keys starting with 'x-' are allowed",
            )
        if SITES_KEY not in self.data:
            raise self._error(1, f"no top-level '{SITES_KEY}:' list")
        sites_node = _child(self.root, SITES_KEY)[1]
        entries = self.data[SITES_KEY]
        if entries is None:
            return [], []
        if not isinstance(entries, list) or not isinstance(sites_node, yaml.SequenceNode):
            raise self._error(_line(sites_node), f"'{SITES_KEY}' must be a list of site entries")
        for key_node in self.duplicate_keys:
            if not any(_within(key_node, entry_node) for entry_node in sites_node.value):
                raise self._error(
                    _line(key_node), f"key {key_node.value!r} appears twice in the same mapping"
                )
        return list(sites_node.value), entries

    def duplicate_key_issues(self, entry_node: yaml.Node) -> list[SiteIssue]:
        """Return an issue for each key repeated inside one entry.

        :param entry_node: the entry's node.
        """
        return [
            SiteIssue(
                _dotted(_key_path(entry_node, key_node) or (key_node.value,)),
                "appears twice in the same mapping; remove one",
                _line(key_node),
            )
            for key_node in self.duplicate_keys
            if _within(key_node, entry_node)
        ]

    def _error(self, line: int, message: str) -> SitesFileError:
        """Build a file-level error located at ``line``."""
        return SitesFileError(f"{self.path}:{line}: {message}")


def _describe_yaml_error(exc: yaml.MarkedYAMLError) -> str:
    """Return ``line:column: invalid YAML: ...`` for a parser error, naming where its context began."""
    mark = exc.problem_mark or exc.context_mark
    where = f"{mark.line + 1}:{mark.column + 1}" if mark else "1"
    context = exc.context or ""
    if context and exc.context_mark and exc.problem_mark and exc.context_mark.line != exc.problem_mark.line:
        context += f" (line {exc.context_mark.line + 1})"
    return f"{where}: invalid YAML: {', '.join(part for part in (context, exc.problem) if part)}"


def _line(node: yaml.Node) -> int:
    """Return the 1-based line where ``node`` starts."""
    return node.start_mark.line + 1


def _within(inner: yaml.Node, outer: yaml.Node) -> bool:
    """Tell whether ``inner`` lies inside the text span of ``outer``."""
    return outer.start_mark.index <= inner.start_mark.index < outer.end_mark.index


def _child(node: yaml.Node, part: str | int) -> tuple[yaml.Node, yaml.Node] | None:
    """Return ``(node to point at, node to descend into)`` for one step of a location, if present.

    For a mapping the key's node is pointed at and the value's node descended into; the last
    occurrence wins, as it does in the constructed data (an entry's own key beats a merged one).
    """
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in reversed(node.value):
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(part):
                return key_node, value_node
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        return node.value[part], node.value[part]
    return None


def _key_path(node: yaml.Node, key_node: yaml.Node) -> tuple[str | int, ...] | None:
    """Return the location of ``key_node`` below ``node`` (``("metadata", "sidecar")``), if there."""
    if isinstance(node, yaml.MappingNode):
        for candidate, value_node in node.value:
            if candidate is key_node:
                return (candidate.value,)
            below = _key_path(value_node, key_node)
            if below is not None:
                return (candidate.value, *below)
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            below = _key_path(item, key_node)
            if below is not None:
                return (index, *below)
    return None


def _line_of(entry_node: yaml.Node, loc: tuple[str | int, ...]) -> int:
    """Return the line of the deepest part of ``loc`` present in the entry."""
    line = _line(entry_node)
    node = entry_node
    for part in loc:
        step = _child(node, part)
        if step is None:
            break
        line, node = _line(step[0]), step[1]
    return line


def _dotted(loc: tuple[str | int, ...]) -> str:
    """Render a pydantic location as ``metadata.tags``, ``required_metadata[0]`` or ``tags.X (key)``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part == "[key]":
            text += " (key)"
        else:
            text += f".{part}" if text else part
    return text


def _section_model(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """Return the configuration model found at ``loc`` (``SiteConfig`` for ``()``), if it is one."""
    model: type[BaseModel] = SiteConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _unknown_key_message(loc: tuple[str | int, ...]) -> str:
    """Explain an unknown key, suggesting the closest known one or listing the known ones."""
    model = _section_model(loc[:-1])
    if model is None:
        return "unknown key"
    known = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; known keys here: {', '.join(known)}"


def _issue_from_pydantic(error: ErrorDetails, entry_node: yaml.Node) -> SiteIssue:
    """Turn one pydantic error into an issue; input values are left out on purpose."""
    loc = tuple(error["loc"])
    if error["type"] == "value_error":
        message = str(error.get("ctx", {}).get("error", error["msg"]))
    elif error["type"] == "extra_forbidden":
        message = _unknown_key_message(loc)
    elif error["type"] == "missing":
        message = "required key is missing"
    else:
        message = error["msg"]
    return SiteIssue(_dotted(loc), message, _line_of(entry_node, loc))


def _raw_id(entry: Any) -> str | None:
    """Return an entry's ``id`` as written, when it is a non-empty string."""
    site_id = entry.get("id") if isinstance(entry, dict) else None
    return site_id if isinstance(site_id, str) and site_id else None


def _repeated_id_issue(index: int, ids: list[str | None], entry_nodes: list[yaml.Node]) -> SiteIssue:
    """Describe an id shared with other entries, naming where those entries are."""
    others = ", ".join(
        f"{SITES_KEY}[{other}] (line {_line(entry_nodes[other])})"
        for other, site_id in enumerate(ids)
        if site_id == ids[index] and other != index
    )
    line = _line_of(entry_nodes[index], ("id",))
    return SiteIssue("id", f"also used by {others}; site ids must be unique", line)
