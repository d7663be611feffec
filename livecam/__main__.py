from livecam.cli import app

app(prog_name="livecam")
