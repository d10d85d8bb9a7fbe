"""Locust users that behave like a customer-service tool: mostly one message, sometimes a small batch."""

from __future__ import annotations

import os
import random

from locust import FastHttpUser, between, task

MESSAGES = [
    "Where is my order? It was supposed to arrive yesterday.",
    "Thanks so much, the replacement works perfectly!",
    "I was charged twice for the same subscription, please fix this.",
    "How do I change the delivery address on my account?",
    "Absolutely terrible experience, nobody answers the phone.",
    "The app is fine I guess.",
    "Great support today, Maria solved it in five minutes.",
    "Can I return an item after 30 days?",
    "This is the third time the package arrived damaged. I want a refund now.",
    "ok",
    "Love the new update, much faster than before!",
    "My invoice shows the wrong VAT number.",
    "not sure what to think about the new pricing",
    "hmm it kind of works but also kind of doesn't",
]
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
