"""Locust users that behave like a customer-service tool: mostly one message, sometimes a small batch."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

from locust import FastHttpUser, between, task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loadtests.messages import MESSAGES

API_KEY = os.environ.get("SENTIMENT_LOADTEST_API_KEY", "")
WAIT = float(os.environ.get("SENTIMENT_LOADTEST_WAIT_S", "0"))


class SentimentUser(FastHttpUser):
    wait_time = between(0, WAIT)

    def on_start(self) -> None:
        self.headers = {"x-api-key": API_KEY} if API_KEY else {}

    @task(8)
    def one_message(self) -> None:
        self.client.post("/v1/sentiment", json={"text": random.choice(MESSAGES)}, headers=self.headers,
                         name="/v1/sentiment [1 text]")

    @task(2)
    def small_batch(self) -> None:
        texts = random.sample(MESSAGES, random.randint(2, 8))
        self.client.post("/v1/sentiment", json={"texts": texts}, headers=self.headers,
                         name="/v1/sentiment [2-8 texts]")
