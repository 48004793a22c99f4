"""The code interpreter behind execd's `/code` routes: one Jupyter kernel per context.

execd itself never imports jupyter_client or pyzmq (its idle memory and start-up stay what they are,
and the self-contained executable carries neither). A context's kernel is started and driven by
the kernel bridge (`bridge.py`), a small program run with the *image's* Python, next to the
ipykernel that the image's kernelspecs name; execd talks to it over a pipe (`channel.py`).
Nothing here is imported before the first `/code` request, except the kernelspec scan and the
readiness listener at start-up (both standard library only, and only after execd listens).
"""
