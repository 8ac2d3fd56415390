"""Drives the plugin-host console in the system's Chromium (Playwright).

Run by tests/tests/console.rs with:
    python console_browser.py <registry-url> <gateway-url> <plugin-file> <plugin> <remote> <refused-file> <versioned> <artifacts-dir>

Opens /console, checks the plugin and the remote service are listed, that
the plugin's file shows loaded and the refused file its reason, that
traffic through the gateway shows as requests per second, that the
service with two versions lists both and takes a traffic split set with
the page's form (90/10, sticky on a header), opens /docs once and checks an operation of the remote is rendered, removes
the plugin file and sees its row go without a reload, deregisters the
remote with the page's button, and sees its row go. Screenshots go to the
artifacts directory; any failure prints why and exits 1 (after a
screenshot of the page as it was).
"""

import os
import re
import sys
import threading
import time
import urllib.request

from playwright.sync_api import expect, sync_playwright

registry, gateway, plugin_file, plugin, remote, refused, versioned, artifacts = sys.argv[1:9]
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
        if message.type == "error":
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
        plugin_file_row = page.locator(
            f'#files tr[data-file="{os.path.basename(plugin_file)}"]'
        )
        expect(plugin_file_row).to_contain_text("loaded")
        expect(plugin_file_row).to_contain_text(plugin)
        refused_row = page.locator(f'#files tr[data-file="{refused}"]')
        expect(refused_row).to_contain_text("refused")
        expect(refused_row).to_contain_text("ELF")

        # 60 requests over about 3 s: the page turns the counters of two
        # polls into a rate.
        def traffic():
            for _ in range(60):
                with urllib.request.urlopen(f"{gateway}/api/{remote}/hello?name=x") as answer:
                    answer.read()
                time.sleep(0.05)

        sender = threading.Thread(target=traffic)
        sender.start()
        rate = remote_row.locator("td.num").first
        expect(rate).to_have_text(re.compile(r"^[1-9][0-9]*\.[0-9]$"))
        sender.join()
        page.screenshot(path=os.path.join(artifacts, "console-listed.png"), full_page=True)

        versioned_row = page.locator(f'#services tr[data-service="{versioned}"]')
        expect(versioned_row.locator('li[data-version="1.0.0"]')).to_have_count(1)
        expect(versioned_row.locator('li[data-version="2.0.0"]')).to_contain_text("default")
        page.select_option("#split-service", versioned)
        current_split = page.locator("#split-current")
        expect(current_split).to_contain_text("no split")
        page.fill('#split-weights input[data-version="1.0.0"]', "90")
        page.fill('#split-weights input[data-version="2.0.0"]', "10")
        page.fill("#split-sticky", "X-User-Id")
        page.click("#split-set")
        expect(page.locator("#action-result")).to_contain_text(
            f"setting the split of {versioned}: done"
        )
        expect(current_split).to_contain_text("1.0.0: 90, 2.0.0: 10")
        expect(current_split).to_contain_text("sticky on header X-User-Id")
        page.screenshot(path=os.path.join(artifacts, "console-split.png"), full_page=True)

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
        expect(plugin_file_row).to_have_count(0)
        expect(remote_row).to_have_count(1)

        button = remote_row.locator("button.deregister")
        button.click()
        expect(button).to_have_text("Confirm deregister")
        button.click()
        expect(remote_row).to_have_count(0)
        expect(page.locator("#action-result")).to_contain_text(f"deregistering {remote}: done")
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
