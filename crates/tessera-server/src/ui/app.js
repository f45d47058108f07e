// Tessera dashboard: live refresh of [data-live] parts, live-following logs,
// confirmations. Plain JavaScript, no libraries.
(function () {
  "use strict";
  // Refresh the live parts of the page every 5 s while it is visible.
  var live = document.querySelectorAll("[data-live]");
  if (live.length) {
    setInterval(function () {
      if (document.visibilityState !== "visible") return;
      if (window.getSelection && String(window.getSelection()) !== "") return;
      fetch(location.href, { credentials: "same-origin", cache: "no-store" })
        .then(function (r) {
          if (r.redirected || !r.ok) return null;
          return r.text();
        })
        .then(function (text) {
          if (!text) return;
          var doc = new DOMParser().parseFromString(text, "text/html");
          live.forEach(function (el) {
            var fresh = doc.getElementById(el.id);
            if (fresh) el.innerHTML = fresh.innerHTML;
          });
        })
        .catch(function () {});
    }, 5000);
  }
  // Follow a job's log: the server streams it until the job ends.
  var log = document.getElementById("log");
  if (log && log.dataset.src) {
    var status = document.getElementById("log-status");
    var max = 2 * 1024 * 1024;
    var follow = function () {
      fetch(log.dataset.src, { credentials: "same-origin", cache: "no-store" })
        .then(function (r) {
          if (!r.ok) {
            return r.json().then(function (e) {
              status.textContent = (e.error && e.error.message) || ("HTTP " + r.status);
            });
          }
          var reader = r.body.getReader();
          var dec = new TextDecoder();
          log.textContent = "";
          var pump = function () {
            return reader.read().then(function (x) {
              if (x.done) {
                status.textContent = "complete";
                log.dataset.done = "true";
                return;
              }
              var atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
              var t = log.textContent + dec.decode(x.value, { stream: true });
              if (t.length > max) t = t.slice(t.length - max);
              log.textContent = t;
              if (atEnd) log.scrollTop = log.scrollHeight;
              return pump();
            });
          };
          status.textContent = log.dataset.active === "true" ? "following" : "complete";
          return pump();
        })
        .catch(function () {
          status.textContent = "disconnected; retrying";
          setTimeout(follow, 2000);
        });
    };
    follow();
  }
  // Ask before buttons that disturb running work.
  document.querySelectorAll("form[data-confirm]").forEach(function (f) {
    f.addEventListener("submit", function (ev) {
      if (!window.confirm(f.dataset.confirm)) ev.preventDefault();
    });
  });
})();
