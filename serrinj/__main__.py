from serrinj.cli import main

main()
