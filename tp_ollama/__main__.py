from tp_ollama.cli import main

main()
