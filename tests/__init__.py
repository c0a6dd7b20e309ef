"""Test packages (tests.service, tests.e2e) are named under ``tests`` so that they never
shadow the ``service`` import package under test."""
