from fedtune.cli import main

main()
