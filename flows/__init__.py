"""Prefect flows: one per stage, the whole pipeline, promotion and schedules."""

from tasks import env

env.apply()
