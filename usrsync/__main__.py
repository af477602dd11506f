from usrsync.cli import main

main()
