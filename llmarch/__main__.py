from llmarch.cli import main

main()
