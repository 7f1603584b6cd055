from benchmarks.quality.cli import main

main()
