from sardfq_export.cli import entry

entry()
