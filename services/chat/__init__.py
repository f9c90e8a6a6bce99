"""Chat service: multilingual customer-service assistant grounded in a knowledge base, and product copy."""
