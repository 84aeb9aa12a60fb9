"""sqlite-utils: the library, not its command-line front end (its `click` import stays:
the library's utils and plugin specs use it). pandas is only looked up by name for
DataFrame inserts, which outpost never does."""

excludedimports = ["sqlite_utils.cli"]
