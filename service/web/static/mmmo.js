// Shared by the dashboard's pages: API calls with the session cookie, HTML escaping, the header.
'use strict';

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === 'string' ? detail
      : Array.isArray(detail) ? detail.map(d => d && d.msg !== undefined ? d.msg : JSON.stringify(d)).join('; ')
      : JSON.stringify(detail));
    this.status = status; this.detail = detail;
  }
}

// The page's CSRF token (the server writes it into <meta name="mmmo-csrf">): the API refuses a
// cookie-authenticated POST, PUT, PATCH or DELETE without it, and from any other origin.
const csrfToken = () => document.querySelector('meta[name="mmmo-csrf"]')?.content || '';

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (!['GET', 'HEAD', 'OPTIONS'].includes((options.method || 'GET').toUpperCase())) headers.set('X-CSRF-Token', csrfToken());
  const response = await fetch(path, {credentials: 'same-origin', ...options, headers});
  if (response.status === 401) {
    location.href = `/login?next=${encodeURIComponent(location.pathname)}`;
    throw new ApiError(401, 'logged out');
  }
  const type = response.headers.get('content-type') || '';
  const body = response.status === 204 ? null : type.includes('json') ? await response.json() : await response.text();
  if (!response.ok) throw new ApiError(response.status, body && body.detail !== undefined ? body.detail : body);
  return body;
}

const esc = s => String(s ?? '').replace(/[&<>"']/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
const fmt = v => typeof v === 'number' ? (Number.isInteger(v) ? String(v) : v.toFixed(3)) : String(v ?? '');
// The API's times carry their offset (UTC); one without is read as UTC too.
const instant = iso => new Date(/(Z|[+-]\d\d:?\d\d)$/i.test(iso) ? iso : iso + 'Z');
const when = iso => iso ? instant(iso).toLocaleString() : '';
const ago = iso => {
  if (!iso) return '';
  const s = Math.max(0, (Date.now() - instant(iso)) / 1000);
  return s < 60 ? `${s.toFixed(0)} s ago` : s < 3600 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
};

function header(active) {
  const links = [['/', 'Studies'], ['/workers', 'Workers']]
    .map(([href, label]) => `<a href="${href}" class="${active === href ? 'active' : ''}">${label}</a>`).join('');
  document.querySelector('header').innerHTML =
    `<a class="brand" href="/">mmmo</a><nav>${links}</nav>` +
    `<form method="post" action="/logout" class="logout"><input type="hidden" name="csrf" value="${esc(csrfToken())}">` +
    '<button type="submit">Log out</button></form>';
}
