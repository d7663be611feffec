"""MuseTalk v1.5: models manifest, safe weight loading, whisper features and the neural engine."""
