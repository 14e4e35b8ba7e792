// Drives `meshctl dashboard` in headless Chromium (Debian's, through playwright-core): waits for
// each wanted edge ("source|destination|state") to be drawn, waits until the page has refreshed
// with rates, prints each edge's label and colour, and writes a screenshot.
//
// usage: node check.cjs <url> <screenshot.png> <source|destination|state>...
"use strict";
const { chromium } = require(process.env.NODEMESH_PLAYWRIGHT_CORE || "playwright-core");

async function main() {
  const [url, shot, ...wanted] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.NODEMESH_CHROMIUM || "/usr/bin/chromium",
    // root in a test namespace: Chromium's own sandbox needs user namespaces it may not get
    args: ["--no-sandbox"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1200, height: 760 } });
    await page.goto(url);
    // Rates need two scrapes: wait for the third refresh.
    await page.waitForFunction(() => Number(document.body.dataset.updates || 0) >= 3, null, {
      timeout: 30000,
    });
    for (const w of wanted) {
      const [source, destination, state] = w.split("|");
      const sel = `g.edge[data-source="${source}"][data-destination="${destination}"][data-state="${state}"]`;
      await page.waitForSelector(sel, { timeout: 30000 });
      const e = await page.$eval(sel, (g) => ({
        label: g.querySelector("text").textContent,
        stroke: getComputedStyle(g.querySelector("line")).stroke,
      }));
      console.log(`edge ${source} -> ${destination} state=${state} stroke=${e.stroke} label=${e.label}`);
    }
    console.log(`status ${await page.textContent("#status")}`);
    await page.screenshot({ path: shot });
    console.log(`screenshot ${shot}`);
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  console.error(`dashboard check failed: ${e.stack || e}`);
  process.exit(1);
});
