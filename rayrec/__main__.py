from rayrec.cli import main

main()
