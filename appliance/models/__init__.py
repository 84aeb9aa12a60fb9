"""Models and their versions: the repository on disk (repository.py, model_config.py), one
version's lifecycle (versions.py, loaded.py, ensemble.py), traffic policies (traffic.py) and the
manager that decides what is loaded and which version is active (manager.py).

May import: appliance.scheduling, appliance.config, appliance.observe, appliance.errors, engines.
"""
