"""Teacher responses from an OpenAI-compatible API: durable cache, async fetcher, Ray actor."""

from gad_ray.teacher.cache import ResponseCache, Result
from gad_ray.teacher.fetcher import Fetcher, TeacherError, TeacherFetcher

__all__ = ["Fetcher", "ResponseCache", "Result", "TeacherError", "TeacherFetcher"]
