"""Prefect tasks: thin wrappers that call opd/, log, and write their stage's outputs."""

from tasks import env

env.apply()
