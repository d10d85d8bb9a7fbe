"""Short customer-service messages (the product's traffic), varied in length and sentiment."""

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
