"""Helpers shared by the test directories: `from support.polling import wait_for`.

tests/ is on sys.path in every pytest run (tests/conftest.py lives there and tests/ is no package), so
each test directory imports this package the same way. standin_trainer.py is a script, run by the
stand-in trainer pods.
"""
