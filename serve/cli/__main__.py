from serve.cli import app

app()
