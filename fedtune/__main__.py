from fedtune.cli import entry

entry()
