"""The one place that reads and writes files: atomic writes, safe checkpoint readers, strict state-dict loading.

Every write goes through a temp file in the destination folder and a rename, so a killed process never leaves a
half-written file under the final name; the file gets the mode any other tool would give it under the process's
umask. Commands call ``ensure_writable`` and ``check_destinations`` (what an output may replace) on their
destinations before they start the work. Pickled files are only read with ``torch.load(weights_only=True)``: loading
a file can never run code; a zip archive (``.pth``, ``.npz``) is refused by its table of contents before any member
is inflated when it declares more than a real one could hold. YAML is read as UTF-8 text by one loader
(``YamlLoader``: safe, YAML 1.2 numbers, duplicate keys refused), and written by the matching dumper, so what segrank
writes loads again to the same values.
"""

from __future__ import annotations

from segrank.files.destinations import (
    STALE_AFTER_S,
    WRITE_ERRNOS,
    WriteError,
    check_destinations,
    check_folder_destination,
    file_key,
    is_locked,
    is_stale,
    keyed,
    naming_write_errors,
    refuse_inputs,
    remove_stale_temps,
    replace_folder,
    staged_write,
)
from segrank.files.reading import (
    ARCHIVE_RATIO,
    ARCHIVE_SLACK,
    check_archive,
    load_state_dict_strict,
    read_npz,
    read_safetensors,
    read_torch,
)
from segrank.files.writing import (
    TEMP_FILE,
    append_line,
    atomic_write,
    current_umask,
    ensure_writable,
    hold_lock,
    json_safe,
    remove_temps,
    write_json,
    write_text,
)
from segrank.files.yaml_io import (
    MAX_YAML_BYTES,
    MAX_YAML_DEPTH,
    YAML12_FLOAT,
    YAML12_INT,
    DuplicateKeyError,
    YamlDumper,
    YamlLoader,
    dump_yaml,
    parse_yaml,
    read_text,
    read_yaml,
    yaml12_resolvers,
    yaml_problem,
)

__all__ = [
    "ARCHIVE_RATIO",
    "ARCHIVE_SLACK",
    "DuplicateKeyError",
    "MAX_YAML_BYTES",
    "MAX_YAML_DEPTH",
    "STALE_AFTER_S",
    "TEMP_FILE",
    "WRITE_ERRNOS",
    "WriteError",
    "YAML12_FLOAT",
    "YAML12_INT",
    "YamlDumper",
    "YamlLoader",
    "append_line",
    "atomic_write",
    "check_archive",
    "check_destinations",
    "check_folder_destination",
    "current_umask",
    "dump_yaml",
    "ensure_writable",
    "file_key",
    "hold_lock",
    "is_locked",
    "is_stale",
    "json_safe",
    "keyed",
    "load_state_dict_strict",
    "naming_write_errors",
    "parse_yaml",
    "read_npz",
    "read_safetensors",
    "read_text",
    "read_torch",
    "read_yaml",
    "refuse_inputs",
    "remove_stale_temps",
    "remove_temps",
    "replace_folder",
    "staged_write",
    "write_json",
    "write_text",
    "yaml12_resolvers",
    "yaml_problem",
]
