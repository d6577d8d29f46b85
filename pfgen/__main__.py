from pfgen.cli import main

main()
