from fedsoda_cli.cli.app import main

main()
