from tao_pipeline.cli.commands import main

main()
