"""Drives the plugin-host console in the system's Chromium (Playwright).

Run by tests/tests/console.rs with:
    python console_browser.py <registry-url> <plugin-file> <plugin> <remote> <artifacts-dir>

Opens /console, checks the plugin and the remote service are listed,
opens /docs once and checks an operation of the remote is rendered, removes
the plugin file and sees its row go without a reload, deregisters the
remote with the page's button, and sees its row go. Screenshots go to the
artifacts directory; any failure prints why and exits 1 (after a
screenshot of the page as it was).
"""

import os
import sys

from playwright.sync_api import expect, sync_playwright

registry, plugin_file, plugin, remote, artifacts = sys.argv[1:6]
os.makedirs(artifacts, exist_ok=True)
# Every wait is bounded: the whole run stays well under a minute.
expect.set_options(timeout=15_000)

problems = []

with sync_playwright() as playwright:
    browser = playwright.chromium.launch(
        executable_path="/usr/bin/chromium",
        args=["--no-sandbox", "--disable-dev-shm-usage"],
    )
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    # CSP violations and script errors surface here.
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    def on_console(message):
        # Until the host reports plugin files, the console shows that
        # endpoint's 404 on the page; the browser logs it too.
        missing_files = message.location.get("url", "").endswith(
            "/api/registry/plugins/files"
        )
        if message.type == "error" and not missing_files:
            problems.append(f"console error: {message.text} ({message.location})")

    page.on("console", on_console)
    current = page
    try:
        page.goto(f"{registry}/console")
        plugin_row = page.locator(f'#services tr[data-service="{plugin}"]')
        remote_row = page.locator(f'#services tr[data-service="{remote}"]')
        expect(plugin_row).to_contain_text("plugin")
        expect(remote_row).to_contain_text("remote")
        expect(remote_row).to_contain_text("healthy")
        page.screenshot(path=os.path.join(artifacts, "console-listed.png"), full_page=True)

        docs = browser.new_page(viewport={"width": 1400, "height": 900})
        docs.on("pageerror", lambda error: problems.append(f"docs page error: {error}"))
        current = docs
        docs.goto(f"{registry}/docs")
        operation = docs.locator(".opblock", has_text=f"/api/{remote}/hello")
        expect(operation.first).to_be_visible()
        docs.screenshot(path=os.path.join(artifacts, "docs.png"), full_page=True)
        docs.close()
        current = page

        # A page that reloads loses this mark.
        page.evaluate("window.loadedOnce = true")
        os.remove(plugin_file)
        expect(plugin_row).to_have_count(0)
        expect(remote_row).to_have_count(1)

        button = remote_row.locator("button.deregister")
        button.click()
        expect(button).to_have_text("Confirm deregister")
        button.click()
        expect(remote_row).to_have_count(0)
        expect(page.locator("#action-result")).to_contain_text(f"deregistered {remote}")
        if page.evaluate("window.loadedOnce") is not True:
            problems.append("the page reloaded: it should update in place")
        page.screenshot(path=os.path.join(artifacts, "console-after.png"), full_page=True)
    except Exception as error:  # the test prints the reason and fails
        problems.append(f"{type(error).__name__}: {error}")
        current.screenshot(path=os.path.join(artifacts, "console-failure.png"), full_page=True)
    browser.close()

if problems:
    print("\n".join(problems))
    sys.exit(1)
print("console checked in the browser")
