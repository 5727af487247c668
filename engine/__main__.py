from tug.engine.cli import main

main()
