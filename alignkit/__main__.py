from alignkit.cli.commands import main

main()
