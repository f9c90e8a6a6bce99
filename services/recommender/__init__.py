"""Recommender service: collaborative filtering, content-based cold start, real-time feedback and
FAISS retrieval behind ``cbec.recommender.v1.RecommenderService``."""
