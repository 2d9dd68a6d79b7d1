from ptft.cli import main

main()
