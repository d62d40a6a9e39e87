// Log in: POST the credentials as JSON; the node answers with an HttpOnly session cookie.
const form = document.querySelector("#login-form");
const error = document.querySelector("#login-error");

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  error.hidden = true;
  const rsp = await fetch("/api/v1/session", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      username: document.querySelector("#username").value,
      password: document.querySelector("#password").value,
    }),
  });
  if (rsp.ok) {
    window.location.assign("/");
    return;
  }
  error.textContent = rsp.status === 429
    ? `Too many attempts; try again in ${rsp.headers.get("Retry-After")} s.`
    : "Unknown user or wrong password.";
  error.hidden = false;
});
