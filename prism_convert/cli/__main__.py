from prism_convert.cli.app import main

main()
