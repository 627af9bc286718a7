from clickflow.cli import main

main()
