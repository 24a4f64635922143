"""Where fgray keeps files: a local path or a storage URI (`s3://`, `gs://`, anything
`pyarrow.fs` opens), and whole-file writes that a reader never sees half done.

A *location* is a string: a local path (made absolute with `absolute`) or a URI, pyarrow's
query options included (`s3://bucket/x?endpoint_override=host:9000&scheme=http`). `resolve`
gives the pyarrow filesystem (one per store and process, built from the standard places:
AWS_ENDPOINT_URL, AWS_*, profiles, instance roles, GOOGLE_*) and the path inside it; `join`
appends parts before a query; `as_location` turns a path inside a filesystem back into a
location like a given one; `display` drops the query for people; `check_writable` proves a
location writable (one probe, deleted) before any work starts. `Location` is a location
resolved once (made absolute) and passed everywhere as it is: a study's folder is one.

Folders: `upload_tree`/`download_tree`/`local_copy`/`move_tree` move a folder between local
disk and a location; `Mirror` keeps a location a copy of a local folder a run writes as it
goes (a run in object storage trains in local scratch, `scratch_folder`, and mirrors it after
each epoch).

Writes are whole or not at all for a reader (`write_bytes`, `write_text`, `write_json`,
`put`): on a local filesystem the data goes to a temporary sibling that is fsync'ed and then
renamed over the target (`atomic_path`); on an object store one PUT is visible only once
complete and replaces the old object whole, which gives the same guarantee without a rename.
Reads return None for a file that does not exist.

The package, each module importing only those before it: `location` (locations and
`Location`), `checks`, `files` (whole-file writes and reads), `scratch`, `trees` (folders).

No Ray, torch or pandas here: every layer (data, models, engine, results, train, tune) uses
it. pyarrow is imported on first use.
"""


from fgray.storage.checks import check_writable
from fgray.storage.files import (
    READ_CHUNK,
    atomic_path,
    copy_stream,
    delete_file,
    put,
    read_bytes,
    read_json,
    read_text,
    temp_sibling,
    write_bytes,
    write_json,
    write_text,
)
from fgray.storage.location import (
    Location,
    absolute,
    as_location,
    display,
    is_local,
    is_uri,
    join,
    resolve,
)
from fgray.storage.scratch import SCRATCH_PREFIX, scratch_folder
from fgray.storage.trees import Mirror, download_tree, local_copy, move_tree, upload_tree

__all__ = [
    "READ_CHUNK", "SCRATCH_PREFIX", "Location", "Mirror", "absolute", "as_location",
    "atomic_path", "check_writable", "copy_stream", "delete_file", "display", "download_tree",
    "is_local", "is_uri", "join", "local_copy", "move_tree", "put", "read_bytes", "read_json",
    "read_text", "resolve", "scratch_folder", "temp_sibling", "upload_tree", "write_bytes",
    "write_json", "write_text",
]
