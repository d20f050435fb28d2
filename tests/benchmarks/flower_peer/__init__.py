"""The Flower arms of the peer benchmark (issue 14): `runner.run_deployment` and `runner.run_legacy`.

mqfed's code does the machine learning (`task`), Flower does the federation. README.md says how each arm is
set up and why.
"""
