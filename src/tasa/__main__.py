from tasa.cli import main

main()
