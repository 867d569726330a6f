"""The file ms-swift imports through `--external_plugins` (kept in its own folder: ms-swift puts the
plugin's folder first on `sys.path`, where a sibling module could shadow a real package)."""
