"""HTTP servers: shared plumbing (app.py) and the teacher server (teacher.py); the LLM server will join them."""
