from bpfilter.cli import main

main()
