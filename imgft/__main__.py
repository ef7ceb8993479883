from imgft.cli import main

main()
