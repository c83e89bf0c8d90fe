from tuneforge.cli import entry

entry()
