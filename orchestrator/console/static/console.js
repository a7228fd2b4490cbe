// The console's only script: confirmation dialogs for the actions, and a background refresh of
// the page's live part. Without it the pages still work (a confirmation page, no refresh).
"use strict";

// Ask before any action; the server shows its own confirmation page unless confirmed=yes.
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (!(form instanceof HTMLFormElement) || !form.dataset.confirm) return;
  if (!window.confirm(form.dataset.confirm)) {
    event.preventDefault();
    return;
  }
  form.elements.namedItem("confirmed").value = "yes";
});

// The outcome of an action (?sent=... / ?refused=...) is shown once: drop it from the address, so
// neither the refresh nor a reload shows it again.
if (/[?&](sent|refused)=/.test(location.search)) {
  history.replaceState(null, "", location.pathname);
}

// Every data-refresh seconds, fetch the page again and swap #live if it changed; skipped
// while the tab is hidden or the operator is typing into one of its forms.
(() => {
  const every = Number(document.body.dataset.refresh || 0) * 1000;
  if (!every) return;
  const tick = async () => {
    const live = document.getElementById("live");
    const typing = document.activeElement && document.activeElement.form;
    if (live && !document.hidden && !typing) {
      try {
        const response = await fetch(location.href, { cache: "no-store" });
        if (response.ok) {
          const page = new DOMParser().parseFromString(await response.text(), "text/html");
          const fresh = page.getElementById("live");
          // Typing began while the page was fetched: keep what was typed.
          const typingNow = document.activeElement && document.activeElement.form;
          if (fresh && !typingNow && fresh.innerHTML !== live.innerHTML) {
            live.innerHTML = fresh.innerHTML;
          }
          const stamp = page.getElementById("rendered");
          if (stamp) document.getElementById("rendered").textContent = stamp.textContent;
        }
      } catch (err) {
        // The console or the network is down for a moment: try again at the next tick.
      }
    }
    setTimeout(tick, every);
  };
  setTimeout(tick, every);
})();
