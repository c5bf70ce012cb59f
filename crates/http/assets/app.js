// credit-ledger web pages: balance, recharge, video generation, history, balance chart and
// the auditor's view. Plain browser JavaScript with no build step and no outside resources:
// the service embeds this file and serves it at /app.js.
//
// Every request carries `Authorization: Bearer <token>` (the user's token, or the admin
// token for /api/admin/*). Errors from the API are `{"error": {"code", "message", ...}}`
// and their message is what the user sees. All visible text lives in the I18N dictionary.
'use strict';

(() => {
  // ---------------------------------------------------------------------------------------
  // Text
  // ---------------------------------------------------------------------------------------
  const I18N = {
    zh: {
      'app.title': '积分中心',
      'nav.credits': '积分',
      'nav.recharge': '充值',
      'nav.signout': '退出',
      'nav.home': '首页',
      'nav.video': '视频生成',
      'nav.history': '记录',
      'nav.chart': '余额走势',
      'nav.audit': '审计',
      'lang.other': 'EN',
      'common.dismiss': '知道了',
      'common.refresh': '刷新',
      'signin.title': '登录',
      'signin.dev.title': '演示模式：以指定用户身份登录',
      'signin.dev.userId': '用户 ID',
      'signin.dev.random': '随机',
      'signin.dev.submit': '登录',
      'signin.dev.needUser': '请输入用户 ID',
      'signin.token.title': '使用已有令牌登录',
      'signin.token.hint': '粘贴宿主应用的访问令牌（例如 Supabase 会话的 access_token）。令牌保存在本浏览器中。',
      'signin.token.submit': '使用此令牌',
      'signin.token.empty': '请粘贴令牌',
      'signin.token.rejected': '令牌无效：{message}',
      'signin.expired': '登录已过期，请重新登录',
      'signin.auditLink': '审计员入口',
      'home.balance': '当前余额',
      'home.user': '用户',
      'home.ctaRecharge': '立即充值',
      'home.ctaVideo': '去生成视频',
      'price.title': '价格',
      'price.video': '积分 / 每个视频',
      'price.rate': '积分 / 1 {currency}',
      'price.refund': '视频生成失败会自动退还积分',
      'currency.cny': '元',
      'recharge.title': '充值积分',
      'recharge.rate': '1 {currency} = {rate} 积分，金额范围 {min} – {max}',
      'recharge.quickCredits': '{credits} 积分',
      'recharge.custom': '自定义金额（{currency}）',
      'recharge.placeholder': '输入金额',
      'recharge.credits': '可获得 {credits} 积分',
      'recharge.pay': '去支付 {amount}',
      'recharge.payNoAmount': '去支付',
      'recharge.paying': '正在创建订单…',
      'recharge.err.empty': '请输入充值金额',
      'recharge.err.nan': '请输入有效的金额数字',
      'recharge.err.positive': '充值金额必须大于 0',
      'recharge.err.decimals': '金额最多保留两位小数',
      'recharge.err.min': '最低充值 {min}',
      'recharge.err.max': '单次最多充值 {max}',
      'recharge.done': '充值成功，{credits} 积分已到账',
      'recharge.pending': '订单已创建，等待支付确认',
      'recharge.redirecting': '正在跳转到支付页面…',
      'recharge.note': '支付由 Stripe 安全处理',
      'recharge.success.title': '支付成功',
      'recharge.success.body': '感谢充值！积分会在支付确认后到账，余额会自动刷新。',
      'recharge.cancel.title': '支付已取消',
      'recharge.cancel.body': '您取消了本次支付，没有产生任何扣款，可以随时重新充值。',
      'video.title': '生成视频',
      'video.prompt': '提示词',
      'video.promptPlaceholder': '描述你想要的视频画面，例如：海边日落，一只小狗在沙滩上奔跑',
      'video.aspect': '画面比例',
      'video.portrait': '竖屏 9:16',
      'video.landscape': '横屏 16:9',
      'video.duration': '时长',
      'video.s10': '10 秒',
      'video.s15': '15 秒',
      'video.cost': '本次消耗 {cost} 积分，当前余额 {credits} 积分',
      'video.generate': '生成视频（{cost} 积分）',
      'video.generating': '提交中…',
      'video.submitted': '任务已提交，消耗 {cost} 积分',
      'video.err.prompt': '请输入提示词',
      'video.err.promptLong': '提示词最多 2000 个字',
      'balance.debt': '您的余额为负（{credits} 积分）：一笔已使用的充值被退款或拒付。充值补足后才能继续生成视频。',
      'video.insufficient': '积分不足：生成一个视频需要 {required} 积分，您当前有 {credits} 积分。充值后即可继续创作。',
      'video.insufficientRecharge': '去充值',
      'video.providerError': '视频服务暂时不可用，请稍后再试。',
      'video.providerRefunded': '视频服务暂时不可用，本次积分已退还，请稍后再试。',
      'video.tasks': '我的任务',
      'video.tasksEmpty': '还没有任务，输入提示词开始创作吧',
      'task.status.processing': '生成中',
      'task.status.running': '生成中',
      'task.status.queued': '排队中',
      'task.status.pending': '等待中',
      'task.status.submitted': '已提交',
      'task.status.succeeded': '已完成',
      'task.status.failed': '失败',
      'task.status.cancelled': '已取消',
      'task.refunded': '已退款',
      'task.progress': '进度 {p}%',
      'task.failure': '失败原因：{reason}',
      'task.charged': '消耗 {n} 积分',
      'task.open': '打开视频',
      'task.finished': '视频任务已结束：{status}',
      'task.doneOk': '视频生成完成',
      'task.doneRefunded': '视频生成失败，{n} 积分已退还',
      'history.title': '记录',
      'history.tabRecharge': '充值记录',
      'history.tabConsumption': '消费记录',
      'history.empty': '暂无记录',
      'history.prev': '上一页',
      'history.next': '下一页',
      'history.page': '第 {n} 页',
      'history.method': '支付方式：{method}',
      'history.completedAt': '到账时间：{time}',
      'history.task': '任务 {id}',
      'history.video': '视频生成',
      'history.refund': '退款',
      'cstatus.completed': '已扣除',
      'cstatus.refunded': '已退款',
      'rstatus.pending': '待支付',
      'rstatus.completed': '已到账',
      'rstatus.failed': '失败',
      'rstatus.cancelled': '已取消',
      'rstatus.reversed': '已退回',
      'chart.title': '余额走势',
      'chart.empty': '还没有余额变动',
      'chart.summary': '共 {n} 次余额变动，当前 {credits} 积分',
      'chart.now': '现在',
      'chart.byTime': '按时间',
      'chart.byEvent': '按事件',
      'audit.title': '审计',
      'audit.token': '管理员令牌',
      'audit.tokenSave': '保存',
      'audit.tokenSaved': '管理员令牌已保存（仅在本标签页内有效）',
      'audit.tokenMissing': '请输入管理员令牌',
      'audit.account': '账户',
      'audit.userIdPlaceholder': '用户 ID',
      'audit.useMine': '我的账户',
      'audit.load': '加载事件',
      'audit.needUser': '请输入用户 ID',
      'audit.eventsCount': '账户 {user} 共 {n} 条事件',
      'audit.colPosition': '位置',
      'audit.colSequence': '序号',
      'audit.colTime': '时间',
      'audit.colType': '类型',
      'audit.colDelta': '变动',
      'audit.colBalance': '余额',
      'audit.colPayload': '内容',
      'audit.chart': '余额走势',
      'audit.balanceAt': '指定时刻余额',
      'audit.balanceAtHint': '留空表示现在',
      'audit.balanceAtSubmit': '查询',
      'audit.balanceAtResult': '{at} 时余额为 {credits} 积分（依据 {n} 条事件）',
      'audit.adjust': '调整积分',
      'audit.adjustCredits': '积分（正数增加，负数扣减）',
      'audit.adjustReason': '原因',
      'audit.adjustSubmit': '提交调整',
      'audit.adjustErrCredits': '请输入非零整数',
      'audit.adjustErrReason': '请填写调整原因',
      'audit.adjustDone': '已调整 {credits} 积分',
      'audit.report': '审计报告',
      'audit.run': '运行审计',
      'audit.ok': '通过：日志与余额一致',
      'audit.notOk': '发现差异',
      'audit.eventsChecked': '已检查事件',
      'audit.accountsChecked': '已检查账户',
      'audit.totals': '合计',
      'audit.discrepancies': '差异',
      'audit.noDiscrepancies': '没有差异',
      'audit.raw': '原始 JSON',
      'err.network': '网络错误，请检查连接后重试',
      'err.generic': '请求失败（HTTP {status}）',
    },
    en: {
      'app.title': 'Credits',
      'nav.credits': 'credits',
      'nav.recharge': 'Recharge',
      'nav.signout': 'Sign out',
      'nav.home': 'Home',
      'nav.video': 'Video',
      'nav.history': 'History',
      'nav.chart': 'Balance chart',
      'nav.audit': 'Audit',
      'lang.other': '中文',
      'common.dismiss': 'Dismiss',
      'common.refresh': 'Refresh',
      'signin.title': 'Sign in',
      'signin.dev.title': 'Demo mode: sign in as a user',
      'signin.dev.userId': 'User ID',
      'signin.dev.random': 'Random',
      'signin.dev.submit': 'Sign in',
      'signin.dev.needUser': 'Enter a user ID',
      'signin.token.title': 'Sign in with an existing token',
      'signin.token.hint': "Paste your access token from the host app (for example the Supabase session's access_token). It is kept in this browser.",
      'signin.token.submit': 'Use this token',
      'signin.token.empty': 'Paste a token',
      'signin.token.rejected': 'Token rejected: {message}',
      'signin.expired': 'Your session has expired, please sign in again',
      'signin.auditLink': "Auditor's view",
      'home.balance': 'Balance',
      'home.user': 'User',
      'home.ctaRecharge': 'Recharge now',
      'home.ctaVideo': 'Generate a video',
      'price.title': 'Pricing',
      'price.video': 'credits per video',
      'price.rate': 'credits per 1 {currency}',
      'price.refund': 'Credits are refunded automatically when a video fails',
      'currency.cny': 'yuan',
      'recharge.title': 'Buy credits',
      'recharge.rate': '1 {currency} = {rate} credits, amounts from {min} to {max}',
      'recharge.quickCredits': '{credits} credits',
      'recharge.custom': 'Custom amount ({currency})',
      'recharge.placeholder': 'Enter an amount',
      'recharge.credits': 'You get {credits} credits',
      'recharge.pay': 'Pay {amount}',
      'recharge.payNoAmount': 'Pay',
      'recharge.paying': 'Creating checkout…',
      'recharge.err.empty': 'Enter an amount',
      'recharge.err.nan': 'Enter a valid number',
      'recharge.err.positive': 'The amount must be greater than 0',
      'recharge.err.decimals': 'At most 2 decimal places',
      'recharge.err.min': 'The minimum is {min}',
      'recharge.err.max': 'The maximum is {max}',
      'recharge.done': 'Recharge completed: {credits} credits added',
      'recharge.pending': 'Order created, waiting for the payment to be confirmed',
      'recharge.redirecting': 'Redirecting to checkout…',
      'recharge.note': 'Payments are processed securely by Stripe',
      'recharge.success.title': 'Payment successful',
      'recharge.success.body': 'Thank you! Your credits are added as soon as the payment is confirmed; the balance refreshes by itself.',
      'recharge.cancel.title': 'Payment cancelled',
      'recharge.cancel.body': 'You cancelled the payment and nothing was charged. You can recharge at any time.',
      'video.title': 'Generate a video',
      'video.prompt': 'Prompt',
      'video.promptPlaceholder': 'Describe the video, e.g. a puppy running on a beach at sunset',
      'video.aspect': 'Aspect ratio',
      'video.portrait': 'Portrait 9:16',
      'video.landscape': 'Landscape 16:9',
      'video.duration': 'Duration',
      'video.s10': '10 seconds',
      'video.s15': '15 seconds',
      'video.cost': 'This costs {cost} credits; your balance is {credits} credits',
      'video.generate': 'Generate ({cost} credits)',
      'video.generating': 'Submitting…',
      'video.submitted': 'Task submitted, {cost} credits charged',
      'video.err.prompt': 'Enter a prompt',
      'video.err.promptLong': 'The prompt is limited to 2000 characters',
      'balance.debt': 'Your balance is negative ({credits} credits): a recharge you had already spent was refunded or disputed. Top up to generate videos again.',
      'video.insufficient': 'Not enough credits: a video needs {required} credits and you have {credits}. Recharge to keep creating.',
      'video.insufficientRecharge': 'Recharge',
      'video.providerError': 'The video service is unavailable, please try again later.',
      'video.providerRefunded': 'The video service is unavailable; your credits were refunded. Please try again later.',
      'video.tasks': 'My tasks',
      'video.tasksEmpty': 'No tasks yet: write a prompt to start',
      'task.status.processing': 'Processing',
      'task.status.running': 'Processing',
      'task.status.queued': 'Queued',
      'task.status.pending': 'Pending',
      'task.status.submitted': 'Submitted',
      'task.status.succeeded': 'Succeeded',
      'task.status.failed': 'Failed',
      'task.status.cancelled': 'Cancelled',
      'task.refunded': 'Refunded',
      'task.progress': 'Progress {p}%',
      'task.failure': 'Reason: {reason}',
      'task.charged': '{n} credits',
      'task.open': 'Open video',
      'task.finished': 'Video task finished: {status}',
      'task.doneOk': 'Your video is ready',
      'task.doneRefunded': 'The video failed; {n} credits were refunded',
      'history.title': 'History',
      'history.tabRecharge': 'Recharges',
      'history.tabConsumption': 'Spending',
      'history.empty': 'No records',
      'history.prev': 'Previous',
      'history.next': 'Next',
      'history.page': 'Page {n}',
      'history.method': 'Method: {method}',
      'history.completedAt': 'Completed: {time}',
      'history.task': 'Task {id}',
      'history.video': 'Video generation',
      'history.refund': 'Refund',
      'cstatus.completed': 'Charged',
      'cstatus.refunded': 'Refunded',
      'rstatus.pending': 'Pending',
      'rstatus.completed': 'Completed',
      'rstatus.failed': 'Failed',
      'rstatus.cancelled': 'Cancelled',
      'rstatus.reversed': 'Reversed',
      'chart.title': 'Balance over time',
      'chart.empty': 'No balance changes yet',
      'chart.summary': '{n} balance changes, now {credits} credits',
      'chart.now': 'now',
      'chart.byTime': 'By time',
      'chart.byEvent': 'By event',
      'audit.title': "Auditor's view",
      'audit.token': 'Admin token',
      'audit.tokenSave': 'Save',
      'audit.tokenSaved': 'Admin token saved (for this tab only)',
      'audit.tokenMissing': 'Enter the admin token',
      'audit.account': 'Account',
      'audit.userIdPlaceholder': 'User ID',
      'audit.useMine': 'My account',
      'audit.load': 'Load events',
      'audit.needUser': 'Enter a user ID',
      'audit.eventsCount': 'Account {user}: {n} events',
      'audit.colPosition': 'Position',
      'audit.colSequence': 'Seq',
      'audit.colTime': 'Recorded',
      'audit.colType': 'Type',
      'audit.colDelta': 'Change',
      'audit.colBalance': 'Balance',
      'audit.colPayload': 'Payload',
      'audit.chart': 'Balance over time',
      'audit.balanceAt': 'Balance at an instant',
      'audit.balanceAtHint': 'Leave empty for now',
      'audit.balanceAtSubmit': 'Look up',
      'audit.balanceAtResult': 'At {at} the balance was {credits} credits ({n} events)',
      'audit.adjust': 'Adjustment',
      'audit.adjustCredits': 'Credits (positive adds, negative removes)',
      'audit.adjustReason': 'Reason',
      'audit.adjustSubmit': 'Apply adjustment',
      'audit.adjustErrCredits': 'Enter a non-zero integer',
      'audit.adjustErrReason': 'Give a reason',
      'audit.adjustDone': 'Adjusted by {credits} credits',
      'audit.report': 'Audit report',
      'audit.run': 'Run audit',
      'audit.ok': 'OK: the journal and the balances agree',
      'audit.notOk': 'Discrepancies found',
      'audit.eventsChecked': 'Events checked',
      'audit.accountsChecked': 'Accounts checked',
      'audit.totals': 'Totals',
      'audit.discrepancies': 'Discrepancies',
      'audit.noDiscrepancies': 'None',
      'audit.raw': 'Raw JSON',
      'err.network': 'Network error, check your connection and retry',
      'err.generic': 'Request failed (HTTP {status})',
    },
  };

  const STORE = {
    token: 'credit-ledger.token',
    lang: 'credit-ledger.lang',
    admin: 'credit-ledger.admin-token',
  };
  const QUICK_AMOUNTS = [10, 50, 100, 200];
  const BALANCE_REFRESH_MS = 30000;
  const TASK_POLL_MS = 3000;
  const FINAL_TASK_STATUSES = new Set(['succeeded', 'failed', 'cancelled', 'canceled', 'error', 'completed']);

  const state = {
    lang: 'zh',
    token: null,
    adminToken: '',
    userId: null,
    stats: null,
    balance: null,
    devTokenAvailable: null,
    tasks: [],
    taskTimer: null,
    balanceTimer: null,
    burstTimer: null,
    // A balance the API just answered with (after a command), preferred for a moment over
    // /api/stats, whose read tables follow the journal a few milliseconds later.
    pinned: null,
    // Tasks this page created that the task list may not show yet (same reason).
    localTasks: new Map(),
    history: { tab: 'recharge', cursors: [null], page: 0, next: null },
    audit: { userId: null, events: [] },
    chartMode: 'time',
    userEvents: [],
  };

  // ---------------------------------------------------------------------------------------
  // Small helpers
  // ---------------------------------------------------------------------------------------
  const $ = (sel) => document.querySelector(sel);
  const $$ = (sel) => Array.from(document.querySelectorAll(sel));

  function t(key, vars) {
    const dict = I18N[state.lang] || I18N.zh;
    let s = dict[key];
    if (s === undefined) s = I18N.zh[key];
    if (s === undefined) return key;
    if (vars) s = s.replace(/\{(\w+)\}/g, (m, k) => (vars[k] === undefined || vars[k] === null ? m : String(vars[k])));
    return s;
  }

  /** Builds an element; children are nodes or strings (text, never parsed as HTML). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else if (k === 'style' && typeof v === 'object') Object.assign(node.style, v); // CSSOM: allowed under a strict CSP
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null) continue;
      if (k === 'text') node.textContent = v;
      else node.setAttribute(k, String(v));
    }
    for (const c of children.flat(Infinity)) if (c) node.append(c);
    return node;
  }

  function uuid() {
    if (window.crypto && typeof window.crypto.randomUUID === 'function') return window.crypto.randomUUID();
    const b = new Uint8Array(16);
    window.crypto.getRandomValues(b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  function show(node, visible) {
    if (node) node.hidden = !visible;
  }

  function setError(node, message) {
    if (!node) return;
    node.textContent = message || '';
    node.hidden = !message;
  }

  function locale() {
    return state.lang === 'zh' ? 'zh-CN' : 'en-GB';
  }

  function fmtInt(n) {
    if (typeof n !== 'number' || !Number.isFinite(n)) return '—';
    return n.toLocaleString(locale());
  }

  function fmtSigned(n) {
    if (typeof n !== 'number' || !Number.isFinite(n)) return '';
    return (n > 0 ? '+' : '') + fmtInt(n);
  }

  function fmtTime(s) {
    if (!s) return '';
    const d = new Date(s);
    if (Number.isNaN(d.getTime())) return String(s);
    return d.toLocaleString(locale(), {
      year: 'numeric', month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit', second: '2-digit',
    });
  }

  function currency() {
    return String((state.stats && state.stats.currency) || 'cny').toLowerCase();
  }

  function currencyName() {
    const c = currency();
    const key = `currency.${c}`;
    const name = t(key);
    return name === key ? c.toUpperCase() : name;
  }

  const CURRENCY_SYMBOLS = { cny: '¥', usd: '$', eur: '€', gbp: '£', jpy: '¥', hkd: 'HK$' };

  function fmtMoney(yuan) {
    const n = Number(yuan);
    if (!Number.isFinite(n)) return '—';
    const sym = CURRENCY_SYMBOLS[currency()];
    return sym ? `${sym}${n.toFixed(2)}` : `${n.toFixed(2)} ${currency().toUpperCase()}`;
  }

  function videoCost() {
    const c = state.stats && Number(state.stats.video_cost);
    return Number.isFinite(c) ? c : null;
  }

  function creditsPerYuan() {
    const c = state.stats && Number(state.stats.credits_per_yuan);
    return Number.isFinite(c) && c > 0 ? c : null;
  }

  function rechargeLimits() {
    const s = state.stats || {};
    const min = Number(s.recharge_min_yuan);
    const max = Number(s.recharge_max_yuan);
    return {
      min: Number.isFinite(min) && min > 0 ? min : 1,
      max: Number.isFinite(max) && max > 0 ? max : 10000,
    };
  }

  function decodeJwtSub(token) {
    try {
      const part = token.split('.')[1];
      if (!part) return null;
      const b64 = part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '=');
      const json = decodeURIComponent(Array.from(atob(b64), (c) => '%' + c.charCodeAt(0).toString(16).padStart(2, '0')).join(''));
      const claims = JSON.parse(json);
      return typeof claims.sub === 'string' ? claims.sub : null;
    } catch (_) {
      return null;
    }
  }

  let toastTimer = null;
  function toast(message, kind) {
    const node = $('#toast');
    node.textContent = message;
    node.className = `toast ${kind || ''}`.trim();
    node.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { node.hidden = true; }, 5000);
  }

  // ---------------------------------------------------------------------------------------
  // API
  // ---------------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, code, message, body) {
      super(message);
      this.status = status;
      this.code = code;
      this.body = body || {};
    }
  }

  /**
   * Calls the API. `admin` sends the admin token instead of the user's. A 401 on a user
   * call signs the user out (the token expired or was revoked).
   */
  async function api(path, { method = 'GET', body, admin = false, headers = {}, token } = {}) {
    const h = { Accept: 'application/json', ...headers };
    const bearer = token !== undefined ? token : (admin ? state.adminToken : state.token);
    if (bearer) h.Authorization = `Bearer ${bearer}`;
    if (body !== undefined) h['Content-Type'] = 'application/json';
    let res;
    try {
      res = await fetch(path, {
        method,
        headers: h,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
        credentials: 'same-origin',
      });
    } catch (_) {
      throw new ApiError(0, 'network', t('err.network'));
    }
    let data = null;
    const text = await res.text();
    if (text) {
      try { data = JSON.parse(text); } catch (_) { data = null; }
    }
    if (!res.ok) {
      const err = (data && typeof data.error === 'object' && data.error) || {};
      const e = new ApiError(res.status, err.code || `http_${res.status}`, err.message || t('err.generic', { status: res.status }), err);
      if (res.status === 401 && !admin && token === undefined && state.token) signOut(t('signin.expired'));
      throw e;
    }
    return data;
  }

  function withQuery(path, params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== '') q.set(k, v);
    const s = q.toString();
    return s ? `${path}?${s}` : path;
  }

  /** Follows `next_cursor` to collect a whole event stream (bounded). */
  async function fetchAllEvents(path, admin) {
    const all = [];
    let cursor = null;
    for (let page = 0; page < 50; page++) {
      const data = await api(withQuery(path, { limit: 100, cursor }), { admin });
      const records = (data && Array.isArray(data.records)) ? data.records : [];
      all.push(...records);
      cursor = data && data.next_cursor;
      if (!cursor || records.length === 0) break;
    }
    return sortEvents(all);
  }

  function sortEvents(events) {
    const key = (e) => {
      const p = Number(e.position);
      if (Number.isFinite(p)) return p;
      const s = Number(e.sequence);
      if (Number.isFinite(s)) return s;
      return new Date(e.recorded_at).getTime() || 0;
    };
    return events.slice().sort((a, b) => key(a) - key(b));
  }

  // ---------------------------------------------------------------------------------------
  // Language
  // ---------------------------------------------------------------------------------------
  function applyLanguage() {
    document.documentElement.lang = state.lang === 'zh' ? 'zh-CN' : 'en';
    document.title = t('app.title');
    for (const node of $$('[data-i18n]')) node.textContent = t(node.getAttribute('data-i18n'));
    for (const node of $$('[data-i18n-placeholder]')) node.placeholder = t(node.getAttribute('data-i18n-placeholder'));
    $('#lang-toggle').textContent = t('lang.other');
    renderStats();
    renderRechargeForm();
    renderTasks();
    if (currentView() === 'history') renderHistory();
    if (currentView() === 'chart') renderUserChart();
    if (state.audit.userId) renderAuditEvents();
  }

  function toggleLanguage() {
    state.lang = state.lang === 'zh' ? 'en' : 'zh';
    localStorage.setItem(STORE.lang, state.lang);
    applyLanguage();
  }

  // ---------------------------------------------------------------------------------------
  // Routing
  // ---------------------------------------------------------------------------------------
  const VIEWS = ['home', 'video', 'history', 'chart', 'audit', 'signin'];

  function requestedView() {
    const name = (location.hash || '').replace(/^#\/?/, '').split('?')[0];
    return VIEWS.includes(name) && name !== 'signin' ? name : 'home';
  }

  function currentView() {
    const v = $$('.view').find((n) => !n.hidden);
    return v ? v.getAttribute('data-view') : null;
  }

  function route() {
    let view = requestedView();
    if (!state.token && view !== 'audit') view = 'signin';
    for (const node of $$('.view')) node.hidden = node.getAttribute('data-view') !== view;
    for (const a of $$('#nav-tabs a')) {
      a.classList.toggle('active', a.getAttribute('data-route') === view);
      if (a.hasAttribute('data-auth')) a.hidden = !state.token;
    }
    if (view === 'signin') prepareSignin();
    if (view === 'video') loadTasks();
    if (view === 'history') loadHistory();
    if (view === 'chart') loadUserChart();
    if (view === 'audit') prepareAudit();
  }

  // ---------------------------------------------------------------------------------------
  // Sign-in
  // ---------------------------------------------------------------------------------------
  function setSignedInChrome() {
    const signedIn = !!state.token;
    show($('#nav-balance'), signedIn);
    show($('#btn-recharge'), signedIn);
    show($('#btn-signout'), signedIn);
    $('#home-user-id').textContent = state.userId || '';
  }

  async function probeDevToken() {
    if (state.devTokenAvailable !== null) return state.devTokenAvailable;
    try {
      // An empty body is refused with a 4xx by the endpoint when it exists; it is 404 when
      // the service runs with a real JWT secret (not demo mode).
      const res = await fetch('/api/dev/token', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
        body: '{}',
        cache: 'no-store',
      });
      state.devTokenAvailable = res.status !== 404 && res.status !== 405;
    } catch (_) {
      state.devTokenAvailable = false;
    }
    return state.devTokenAvailable;
  }

  async function prepareSignin() {
    const input = $('#signin-user-id');
    if (!input.value) input.value = uuid();
    const available = await probeDevToken();
    show($('#dev-signin'), available);
    $('#token-signin').open = !available;
  }

  async function useToken(token) {
    // Check the token before keeping it: /api/stats only answers an authenticated user.
    const stats = await api('/api/stats', { token });
    state.token = token;
    state.userId = decodeJwtSub(token);
    localStorage.setItem(STORE.token, token);
    setSignedInChrome();
    applyStats(stats);
    startBalanceTimer();
    if (!location.hash || location.hash === '#/signin') location.hash = '#/';
    route();
  }

  async function devSignIn(ev) {
    ev.preventDefault();
    const err = $('#signin-error');
    setError(err, '');
    const userId = $('#signin-user-id').value.trim();
    if (!userId) { setError(err, t('signin.dev.needUser')); return; }
    const btn = $('#signin-submit');
    btn.disabled = true;
    try {
      const data = await api('/api/dev/token', { method: 'POST', body: { user_id: userId }, token: null });
      if (!data || typeof data.token !== 'string') throw new ApiError(0, 'bad_response', t('err.generic', { status: '?' }));
      await useToken(data.token);
    } catch (e) {
      if (e.status === 404) {
        state.devTokenAvailable = false;
        show($('#dev-signin'), false);
        $('#token-signin').open = true;
      }
      setError(err, e.message);
    } finally {
      btn.disabled = false;
    }
  }

  async function tokenSignIn(ev) {
    ev.preventDefault();
    const err = $('#signin-error');
    setError(err, '');
    const token = $('#token-input').value.trim().replace(/^Bearer\s+/i, '');
    if (!token) { setError(err, t('signin.token.empty')); return; }
    const btn = $('#token-submit');
    btn.disabled = true;
    try {
      await useToken(token);
      $('#token-input').value = '';
    } catch (e) {
      setError(err, t('signin.token.rejected', { message: e.message }));
    } finally {
      btn.disabled = false;
    }
  }

  function signOut(message) {
    state.token = null;
    state.userId = null;
    state.stats = null;
    state.balance = null;
    state.tasks = [];
    localStorage.removeItem(STORE.token);
    clearInterval(state.balanceTimer);
    clearTimeout(state.taskTimer);
    clearTimeout(state.burstTimer);
    state.localTasks.clear();
    state.pinned = null;
    state.balanceTimer = null;
    state.taskTimer = null;
    closeRecharge();
    setSignedInChrome();
    renderTasks();
    route();
    setError($('#signin-error'), message || '');
  }

  // ---------------------------------------------------------------------------------------
  // Balance and price
  // ---------------------------------------------------------------------------------------
  function applyStats(stats) {
    if (!stats || typeof stats !== 'object') return;
    state.stats = stats;
    const pinned = state.pinned && Date.now() < state.pinned.until ? state.pinned : null;
    if (typeof stats.credits === 'number' && (!pinned || stats.credits === pinned.value)) state.balance = stats.credits;
    if (typeof stats.user_id === 'string' && stats.user_id) {
      state.userId = stats.user_id;
      setSignedInChrome();
    }
    renderStats();
    renderRechargeForm();
  }

  /** Shows a balance the API answered a command with; stale reads do not undo it for 1.5 s. */
  function setBalance(credits) {
    if (typeof credits !== 'number') return;
    state.balance = credits;
    state.pinned = { value: credits, until: Date.now() + 1500 };
    renderStats();
  }

  /** After an action: the read side catches up within moments, so look again a few times. */
  function refreshBalanceSoon() {
    clearTimeout(state.burstTimer);
    const delays = [250, 750, 1500, 3000, 6000];
    let i = 0;
    const tick = async () => {
      await refreshBalance();
      i += 1;
      if (i < delays.length && state.token) state.burstTimer = setTimeout(tick, delays[i]);
    };
    state.burstTimer = setTimeout(tick, delays[0]);
  }

  async function refreshBalance() {
    if (!state.token) return;
    try {
      applyStats(await api('/api/stats'));
    } catch (_) {
      // A failed refresh keeps the last known balance; a 401 has signed the user out.
    }
  }

  function startBalanceTimer() {
    clearInterval(state.balanceTimer);
    state.balanceTimer = setInterval(refreshBalance, BALANCE_REFRESH_MS);
  }

  function renderStats() {
    const b = state.balance;
    const value = $('#balance-value');
    value.textContent = typeof b === 'number' ? fmtInt(b) : '—';
    value.setAttribute('data-credits', typeof b === 'number' ? String(b) : '');
    $('#home-balance').textContent = typeof b === 'number' ? fmtInt(b) : '—';
    // Below zero only through a reversal of spent credits: say so, spending is blocked.
    const debt = $('#debt-notice');
    const inDebt = typeof b === 'number' && b < 0;
    $('#nav-balance').classList.toggle('in-debt', inDebt);
    if (debt) {
      debt.hidden = !inDebt;
      debt.textContent = inDebt ? t('balance.debt', { credits: fmtInt(b) }) : '';
    }
    const cost = videoCost();
    const rate = creditsPerYuan();
    $('#price-video-cost').textContent = cost === null ? '—' : fmtInt(cost);
    $('#price-video-text').textContent = t('price.video');
    $('#price-rate').textContent = rate === null ? '—' : fmtInt(rate);
    $('#price-rate-text').textContent = t('price.rate', { currency: currencyName() });
    $('#video-cost').textContent = cost === null ? '' : t('video.cost', { cost: fmtInt(cost), credits: fmtInt(b) });
    $('#generate-button').textContent = cost === null ? t('video.title') : t('video.generate', { cost: fmtInt(cost) });
  }

  // ---------------------------------------------------------------------------------------
  // Recharge
  // ---------------------------------------------------------------------------------------
  /** Parses a yuan amount typed by the user into integer fen, or returns a message key. */
  function parseAmount(raw) {
    const s = String(raw || '').trim();
    if (!s) return { error: 'recharge.err.empty' };
    if (!/^[+-]?(\d+(\.\d*)?|\.\d+)$/.test(s)) return { error: 'recharge.err.nan' };
    if (s.startsWith('-') || !(Number(s) > 0)) return { error: 'recharge.err.positive' };
    const [intPart, fracPart = ''] = s.replace(/^\+/, '').split('.');
    const frac = fracPart.replace(/0+$/, '');
    if (frac.length > 2) return { error: 'recharge.err.decimals' };
    const fen = Number(intPart || '0') * 100 + Number((frac + '00').slice(0, 2));
    if (!(fen > 0)) return { error: 'recharge.err.positive' };
    const { min, max } = rechargeLimits();
    if (fen < Math.round(min * 100)) return { error: 'recharge.err.min' };
    if (fen > Math.round(max * 100)) return { error: 'recharge.err.max' };
    return { fen, yuan: fen / 100 };
  }

  function creditsForFen(fen) {
    const rate = creditsPerYuan();
    return rate === null ? null : Math.floor((fen * rate) / 100);
  }

  function renderRechargeForm() {
    const rate = creditsPerYuan();
    const { min, max } = rechargeLimits();
    $('#recharge-rate').textContent = rate === null ? '' : t('recharge.rate', {
      currency: currencyName(), rate: fmtInt(rate), min: fmtMoney(min), max: fmtMoney(max),
    });
    $('#custom-amount-label').textContent = t('recharge.custom', { currency: currencyName() });
    for (const btn of $$('#quick-amounts .quick')) {
      const yuan = Number(btn.getAttribute('data-amount'));
      const credits = creditsForFen(yuan * 100);
      btn.replaceChildren(
        el('strong', {}, fmtMoney(yuan)),
        el('span', {}, credits === null ? '' : t('recharge.quickCredits', { credits: fmtInt(credits) })),
      );
    }
    updateRechargePreview(false);
  }

  /** Shows the credits the typed amount buys; `validate` also shows the error message. */
  function updateRechargePreview(validate) {
    const input = $('#custom-amount');
    const parsed = parseAmount(input.value);
    const preview = $('#recharge-credits-preview');
    const pay = $('#pay-button');
    for (const btn of $$('#quick-amounts .quick')) {
      btn.classList.toggle('selected', !parsed.error && Number(btn.getAttribute('data-amount')) * 100 === parsed.fen);
    }
    if (parsed.error) {
      preview.textContent = '';
      pay.textContent = t('recharge.payNoAmount');
      const showError = validate || (input.value.trim() !== '' && parsed.error !== 'recharge.err.min');
      const { min, max } = rechargeLimits();
      setError($('#recharge-error'), showError ? t(parsed.error, { min: fmtMoney(min), max: fmtMoney(max) }) : '');
      input.setAttribute('aria-invalid', showError ? 'true' : 'false');
      return parsed;
    }
    const credits = creditsForFen(parsed.fen);
    preview.textContent = credits === null ? '' : t('recharge.credits', { credits: fmtInt(credits) });
    preview.setAttribute('data-credits', credits === null ? '' : String(credits));
    pay.textContent = t('recharge.pay', { amount: fmtMoney(parsed.yuan) });
    setError($('#recharge-error'), '');
    input.setAttribute('aria-invalid', 'false');
    return parsed;
  }

  function openRecharge() {
    if (!state.token) return;
    const modal = $('#recharge-modal');
    modal.hidden = false;
    document.body.classList.add('modal-open');
    $('#pay-button').disabled = false;
    updateRechargePreview(false);
    setError($('#recharge-error'), '');
    refreshBalance();
    setTimeout(() => $('#custom-amount').focus(), 0);
  }

  function closeRecharge() {
    $('#recharge-modal').hidden = true;
    document.body.classList.remove('modal-open');
  }

  async function submitRecharge(ev) {
    ev.preventDefault();
    const parsed = updateRechargePreview(true);
    if (parsed.error) return;
    const pay = $('#pay-button');
    pay.disabled = true;
    pay.textContent = t('recharge.paying');
    try {
      const data = await api('/api/recharge', {
        method: 'POST',
        body: { amount: parsed.yuan },
        headers: { 'Idempotency-Key': uuid() },
      });
      if (data && typeof data.checkout_url === 'string' && /^https?:\/\//i.test(data.checkout_url)) {
        toast(t('recharge.redirecting'));
        location.assign(data.checkout_url);
        return;
      }
      if (data && data.status === 'completed') {
        closeRecharge();
        $('#custom-amount').value = '';
        toast(t('recharge.done', { credits: fmtInt(Number(data.credits)) }), 'success');
      } else {
        closeRecharge();
        toast(t('recharge.pending'));
      }
      await refreshBalance();
      refreshBalanceSoon();
      if (currentView() === 'history') loadHistory();
      if (currentView() === 'chart') loadUserChart();
    } catch (e) {
      setError($('#recharge-error'), e.message);
    } finally {
      pay.disabled = false;
      updateRechargePreview(false);
    }
  }

  /** The Stripe success and cancel URLs come back to `/?recharge=success|cancel`. */
  function handleRechargeReturn() {
    const params = new URLSearchParams(location.search);
    const result = params.get('recharge');
    if (result !== 'success' && result !== 'cancel') return;
    const banner = $('#recharge-result');
    banner.setAttribute('data-status', result);
    banner.className = `banner ${result === 'success' ? 'banner-success' : 'banner-warning'}`;
    $('#recharge-result-title').setAttribute('data-i18n', `recharge.${result}.title`);
    $('#recharge-result-body').setAttribute('data-i18n', `recharge.${result}.body`);
    $('#recharge-result-title').textContent = t(`recharge.${result}.title`);
    $('#recharge-result-body').textContent = t(`recharge.${result}.body`);
    banner.hidden = false;
    params.delete('recharge');
    params.delete('session_id');
    const rest = params.toString();
    history.replaceState(null, '', location.pathname + (rest ? `?${rest}` : '') + location.hash);
    if (result === 'success') {
      // The webhook may land a moment after the redirect: look again for a little while.
      let tries = 0;
      const timer = setInterval(() => {
        tries += 1;
        refreshBalance();
        if (tries >= 10) clearInterval(timer);
      }, 3000);
    }
  }

  // ---------------------------------------------------------------------------------------
  // Video
  // ---------------------------------------------------------------------------------------
  function isFinal(task) {
    return FINAL_TASK_STATUSES.has(String(task.status || '').toLowerCase());
  }

  async function submitVideo(ev) {
    ev.preventDefault();
    const errNode = $('#video-error');
    setError(errNode, '');
    show($('#insufficient-credits'), false);
    const prompt = $('#video-prompt').value.trim();
    if (!prompt) { setError(errNode, t('video.err.prompt')); return; }
    if (prompt.length > 2000) { setError(errNode, t('video.err.promptLong')); return; }
    const btn = $('#generate-button');
    btn.disabled = true;
    btn.textContent = t('video.generating');
    try {
      const data = await api('/api/video/generate', {
        method: 'POST',
        body: {
          prompt,
          aspect_ratio: $('#video-aspect').value,
          duration: Number($('#video-duration').value),
        },
        headers: { 'Idempotency-Key': uuid() },
      });
      if (data && typeof data.credits === 'number') setBalance(data.credits);
      toast(t('video.submitted', { cost: fmtInt(Number(data && data.credits_charged)) }), 'success');
      $('#video-prompt').value = '';
      if (data && data.task_id) {
        state.localTasks.set(data.task_id, {
          task_id: data.task_id,
          status: data.status || 'processing',
          progress: 0,
          prompt,
          video_url: null,
          failure_reason: null,
          credits_charged: data.credits_charged,
          refunded: false,
          created_at: new Date().toISOString(),
          completed_at: null,
          _added: Date.now(),
        });
      }
      await loadTasks();
      refreshBalanceSoon();
    } catch (e) {
      if (e.code === 'insufficient_credits') {
        const required = typeof e.body.required === 'number' ? e.body.required : videoCost();
        const credits = typeof e.body.credits === 'number' ? e.body.credits : state.balance;
        if (typeof credits === 'number') setBalance(credits);
        $('#insufficient-text').textContent = t('video.insufficient', { required: fmtInt(required), credits: fmtInt(credits) });
        show($('#insufficient-credits'), true);
      } else if (e.code === 'provider_error') {
        setError(errNode, e.body.refunded ? t('video.providerRefunded') : t('video.providerError'));
        refreshBalanceSoon();
        loadTasks();
      } else {
        setError(errNode, e.message);
      }
    } finally {
      btn.disabled = false;
      renderStats();
    }
  }

  async function loadTasks() {
    clearTimeout(state.taskTimer);
    state.taskTimer = null;
    if (!state.token) return;
    try {
      const data = await api(withQuery('/api/video/tasks', { limit: 50 }));
      const tasks = (data && Array.isArray(data.records)) ? data.records : [];
      // Keep showing a just-created task until the list has it (for at most a minute).
      const listed = new Set(tasks.map((x) => x.task_id));
      for (const [id, local] of state.localTasks) {
        if (listed.has(id) || Date.now() - local._added > 60000) state.localTasks.delete(id);
        else tasks.unshift(local);
      }
      const before = new Map(state.tasks.map((x) => [x.task_id, x]));
      let settled = false;
      for (const task of tasks) {
        const old = before.get(task.task_id);
        if (old && (isFinal(task) !== isFinal(old) || !!old.refunded !== !!task.refunded)) {
          settled = true;
          if (task.status === 'succeeded') toast(t('task.doneOk'), 'success');
          else if (task.refunded) toast(t('task.doneRefunded', { n: fmtInt(Number(task.credits_charged) || videoCost()) }));
          else if (isFinal(task)) toast(t('task.finished', { status: taskStatusLabel(task) }));
        }
      }
      state.tasks = tasks;
      renderTasks();
      if (settled) refreshBalanceSoon();
    } catch (_) {
      // Keep the last list; the next poll or refresh tries again.
    }
    if (state.token && state.tasks.some((x) => !isFinal(x) || (x.status === 'failed' && !x.refunded && x.credits_charged > 0))) {
      state.taskTimer = setTimeout(loadTasks, TASK_POLL_MS);
    }
  }

  function taskStatusLabel(task) {
    const s = String(task.status || '').toLowerCase();
    const key = `task.status.${s}`;
    const label = t(key);
    return label === key ? s : label;
  }

  function safeUrl(u) {
    return typeof u === 'string' && /^https?:\/\//i.test(u) ? u : null;
  }

  function renderTasks() {
    const list = $('#task-list');
    if (!list) return;
    const tasks = state.tasks || [];
    show($('#tasks-empty'), !!state.token && tasks.length === 0);
    list.replaceChildren(...tasks.map((task) => {
      const status = String(task.status || '').toLowerCase();
      const progress = Math.max(0, Math.min(100, Number(task.progress) || 0));
      const url = safeUrl(task.video_url);
      const active = !isFinal(task);
      return el('li', {
        class: `task task-${status}`,
        'data-testid': 'task-item',
        'data-task-id': task.task_id,
        'data-status': status,
        'data-refunded': task.refunded ? 'true' : 'false',
      },
      el('div', { class: 'task-head' },
        el('span', { class: `badge badge-${status}`, 'data-testid': 'task-status' }, taskStatusLabel(task)),
        task.refunded ? el('span', { class: 'badge badge-refunded', 'data-testid': 'task-refunded' }, t('task.refunded')) : null,
        el('span', { class: 'task-time' }, fmtTime(task.created_at))),
      el('p', { class: 'task-prompt', 'data-testid': 'task-prompt' }, task.prompt || ''),
      active ? el('div', { class: 'progress', 'data-testid': 'task-progress', 'data-progress': String(progress) },
        el('div', { class: 'progress-bar', style: { width: `${progress}%` } }),
        el('span', { class: 'progress-label' }, t('task.progress', { p: progress }))) : null,
      status === 'succeeded' && url ? el('div', { class: 'task-video' },
        el('video', { src: url, controls: true, preload: 'metadata', playsinline: true, 'data-testid': 'task-video' }),
        el('a', { href: url, target: '_blank', rel: 'noopener noreferrer' }, t('task.open'))) : null,
      task.failure_reason ? el('p', { class: 'task-failure', 'data-testid': 'task-failure' }, t('task.failure', { reason: task.failure_reason })) : null,
      el('p', { class: 'task-meta' },
        typeof task.credits_charged === 'number' ? t('task.charged', { n: fmtInt(task.credits_charged) }) : '',
        ' · ', el('code', {}, String(task.task_id || '').slice(0, 8))));
    }));
  }

  // ---------------------------------------------------------------------------------------
  // History
  // ---------------------------------------------------------------------------------------
  const HISTORY_PAGE = 10;

  function selectHistoryTab(tab) {
    state.history = { tab, cursors: [null], page: 0, next: null, records: [] };
    loadHistory();
  }

  async function loadHistory() {
    const h = state.history;
    for (const b of $$('[data-tab]')) {
      const on = b.getAttribute('data-tab') === h.tab;
      b.classList.toggle('active', on);
      b.setAttribute('aria-selected', on ? 'true' : 'false');
    }
    setError($('#history-error'), '');
    const path = h.tab === 'recharge' ? '/api/recharge' : '/api/consumption';
    try {
      const data = await api(withQuery(path, { limit: HISTORY_PAGE, cursor: h.cursors[h.page] }));
      h.records = (data && Array.isArray(data.records)) ? data.records : [];
      h.next = (data && data.next_cursor) || null;
    } catch (e) {
      h.records = [];
      h.next = null;
      setError($('#history-error'), e.message);
    }
    renderHistory();
  }

  function rechargeStatusLabel(s) {
    const key = `rstatus.${String(s || '').toLowerCase()}`;
    const label = t(key);
    return label === key ? String(s || '') : label;
  }

  function renderHistory() {
    const h = state.history;
    const list = $('#history-list');
    const records = h.records || [];
    show($('#history-empty'), records.length === 0 && $('#history-error').hidden);
    list.replaceChildren(...records.map((r) => (h.tab === 'recharge' ? rechargeRow(r) : consumptionRow(r))));
    $('#history-prev').disabled = h.page === 0;
    $('#history-next').disabled = !h.next;
    $('#history-page').textContent = t('history.page', { n: h.page + 1 });
  }

  function rechargeRow(r) {
    const status = String(r.status || '').toLowerCase();
    const credits = Number(r.credits);
    return el('li', { class: 'record', 'data-testid': 'history-row', 'data-kind': 'recharge', 'data-status': status, 'data-id': r.recharge_id },
      el('div', { class: 'record-main' },
        el('strong', { 'data-testid': 'record-amount' }, fmtMoney(r.amount)),
        el('span', { class: 'credits-plus', 'data-testid': 'record-credits' }, `${fmtSigned(credits)} ${t('nav.credits')}`),
        el('span', { class: `badge badge-${status}`, 'data-testid': 'record-status' }, rechargeStatusLabel(status))),
      el('div', { class: 'record-meta' },
        el('span', {}, fmtTime(r.created_at)),
        r.payment_method ? el('span', {}, t('history.method', { method: r.payment_method })) : null,
        r.completed_at ? el('span', {}, t('history.completedAt', { time: fmtTime(r.completed_at) })) : null,
        el('code', {}, String(r.recharge_id || '').slice(0, 8))));
  }

  /** A consumption record: `id, video_task_id, credits (charged, positive), description, status (completed|refunded), created_at, refunded_at`. */
  function consumptionRow(r) {
    const status = String(r.status || '').toLowerCase();
    const refunded = status === 'refunded' || !!r.refunded_at || r.refunded === true;
    const charged = Math.abs(Number(r.credits));
    const taskId = r.video_task_id || r.task_id;
    const statusKey = `cstatus.${status}`;
    const statusLabel = t(statusKey) === statusKey ? status : t(statusKey);
    return el('li', {
      class: 'record', 'data-testid': 'history-row', 'data-kind': 'consumption', 'data-id': r.id || taskId,
      'data-status': status, 'data-refunded': refunded ? 'true' : 'false',
    },
    el('div', { class: 'record-main' },
      el('strong', {}, r.description || t('history.video')),
      el('span', { class: 'credits-minus', 'data-testid': 'record-credits' },
        Number.isFinite(charged) ? `-${fmtInt(charged)} ${t('nav.credits')}` : ''),
      refunded
        ? el('span', { class: 'badge badge-refunded', 'data-testid': 'record-refunded' }, t('task.refunded'))
        : (status ? el('span', { class: `badge badge-${status}`, 'data-testid': 'record-status' }, statusLabel) : null)),
    el('div', { class: 'record-meta' },
      el('span', {}, fmtTime(r.created_at)),
      refunded && r.refunded_at ? el('span', { class: 'credits-plus' }, `${t('task.refunded')} +${fmtInt(charged)} · ${fmtTime(r.refunded_at)}`) : null,
      taskId ? el('span', {}, t('history.task', { id: String(taskId).slice(0, 8) })) : null));
  }

  // ---------------------------------------------------------------------------------------
  // Balance chart
  // ---------------------------------------------------------------------------------------
  async function loadUserChart() {
    setError($('#chart-error'), '');
    try {
      state.userEvents = await fetchAllEvents('/api/account/events', false);
    } catch (e) {
      state.userEvents = [];
      setError($('#chart-error'), e.message);
    }
    renderUserChart();
  }

  function renderUserChart() {
    const points = balancePoints(state.userEvents);
    const last = points.length ? points[points.length - 1].b : state.balance;
    $('#chart-summary').textContent = points.length ? t('chart.summary', { n: points.length, credits: fmtInt(last) }) : '';
    drawChart($('#balance-chart'), points);
  }

  function renderChartMode() {
    for (const b of $$('[data-chart-mode]')) {
      const on = b.getAttribute('data-chart-mode') === state.chartMode;
      b.classList.toggle('active', on);
      b.setAttribute('aria-pressed', on ? 'true' : 'false');
    }
  }

  function balancePoints(events) {
    const points = [];
    for (const e of events || []) {
      if (e.balance_after === null || e.balance_after === undefined) continue;
      const b = Number(e.balance_after);
      const time = new Date(e.recorded_at).getTime();
      if (!Number.isFinite(b) || !Number.isFinite(time)) continue;
      points.push({ t: time, b, type: e.event_type });
    }
    return points;
  }

  function niceCeil(v) {
    if (v <= 0) return 10;
    const p = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  /** Draws a step plot of the balance against time into `container` as an SVG. */
  function drawChart(container, points) {
    if (!container) return;
    if (!points.length) {
      container.replaceChildren(el('p', { class: 'hint', 'data-testid': 'chart-empty' }, t('chart.empty')));
      return;
    }
    const W = Math.max(280, Math.round(container.clientWidth || 640));
    const H = W < 480 ? 220 : 280;
    const pad = { l: 56, r: 16, t: 16, b: 36 };
    // 'time': x is the instant; 'event': events evenly spaced (bursts stay readable).
    const byEvent = state.chartMode === 'event';
    const pts = byEvent ? points.map((p, i) => ({ ...p, at: p.t, t: i })) : points.map((p) => ({ ...p, at: p.t }));
    points = pts;
    const t0 = points[0].t;
    let t1 = byEvent ? points.length : Math.max(Date.now(), points[points.length - 1].t);
    if (!byEvent && t1 - t0 < 60000) t1 = t0 + 60000;
    const minB = Math.min(0, ...points.map((p) => p.b));
    const maxB = niceCeil(Math.max(...points.map((p) => p.b), 1));
    const lo = minB < 0 ? -niceCeil(-minB) : 0;
    const x = (tm) => pad.l + ((tm - t0) / (t1 - t0)) * (W - pad.l - pad.r);
    const y = (b) => pad.t + (1 - (b - lo) / (maxB - lo)) * (H - pad.t - pad.b);

    const grid = [];
    const ticks = 4;
    for (let i = 0; i <= ticks; i++) {
      const v = lo + ((maxB - lo) * i) / ticks;
      grid.push(svg('line', { x1: pad.l, x2: W - pad.r, y1: y(v), y2: y(v), class: 'grid' }));
      grid.push(svg('text', { x: pad.l - 6, y: y(v) + 4, 'text-anchor': 'end', class: 'axis-label', text: fmtInt(Math.round(v)) }));
    }
    const startLabel = fmtTime(new Date(points[0].at).toISOString());
    const endLabel = byEvent ? fmtTime(new Date(points[points.length - 1].at).toISOString()) : t('chart.now');
    grid.push(svg('text', { x: pad.l, y: H - 10, 'text-anchor': 'start', class: 'axis-label', text: startLabel }));
    grid.push(svg('text', { x: W - pad.r, y: H - 10, 'text-anchor': 'end', class: 'axis-label', text: endLabel }));

    // Step line: the balance holds until the next event, then jumps.
    let d = `M ${x(points[0].t).toFixed(1)} ${y(0).toFixed(1)} V ${y(points[0].b).toFixed(1)}`;
    for (let i = 1; i < points.length; i++) {
      d += ` H ${x(points[i].t).toFixed(1)} V ${y(points[i].b).toFixed(1)}`;
    }
    d += ` H ${x(t1).toFixed(1)}`;
    const area = `${d} V ${y(lo).toFixed(1)} H ${x(points[0].t).toFixed(1)} Z`;

    const dots = points.map((p) => svg('circle', { cx: x(p.t).toFixed(1), cy: y(p.b).toFixed(1), r: 3.5, class: 'dot' },
      svg('title', { text: `${fmtTime(new Date(p.at).toISOString())}\n${p.type || ''}\n${fmtInt(p.b)} ${t('nav.credits')}` })));

    const root = svg('svg', {
      viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img', 'data-testid': 'balance-chart-svg',
      'data-points': points.length, 'aria-label': t('chart.title'),
    },
    grid,
    svg('line', { x1: pad.l, x2: pad.l, y1: pad.t, y2: H - pad.b, class: 'axis' }),
    svg('line', { x1: pad.l, x2: W - pad.r, y1: y(lo), y2: y(lo), class: 'axis' }),
    svg('path', { d: area, class: 'area' }),
    svg('path', { d, class: 'line', 'data-testid': 'balance-line' }),
    dots);
    container.replaceChildren(root);
  }

  // ---------------------------------------------------------------------------------------
  // Auditor's view
  // ---------------------------------------------------------------------------------------
  function prepareAudit() {
    $('#admin-token').value = state.adminToken;
    $('#admin-token-status').textContent = state.adminToken ? t('audit.tokenSaved') : '';
    show($('#audit-use-mine'), !!state.userId);
  }

  function saveAdminToken(ev) {
    if (ev) ev.preventDefault();
    state.adminToken = $('#admin-token').value.trim();
    if (state.adminToken) sessionStorage.setItem(STORE.admin, state.adminToken);
    else sessionStorage.removeItem(STORE.admin);
    $('#admin-token-status').textContent = state.adminToken ? t('audit.tokenSaved') : '';
  }

  function auditPreflight(needUser) {
    const err = $('#audit-error');
    setError(err, '');
    // Whatever is in the field is the token in use, saved or not.
    if ($('#admin-token').value.trim() !== state.adminToken) saveAdminToken();
    if (!state.adminToken) { setError(err, t('audit.tokenMissing')); return null; }
    if (!needUser) return true;
    const userId = $('#audit-user-id').value.trim();
    if (!userId) { setError(err, t('audit.needUser')); return null; }
    return userId;
  }

  async function loadAuditEvents(ev) {
    if (ev) ev.preventDefault();
    const userId = auditPreflight(true);
    if (!userId) return;
    const btn = $('#audit-load-events');
    btn.disabled = true;
    try {
      const events = await fetchAllEvents(`/api/admin/accounts/${encodeURIComponent(userId)}/events`, true);
      state.audit = { userId, events };
      show($('#audit-account'), true);
      setError($('#audit-balance-result'), '');
      setError($('#audit-adjust-result'), '');
      renderAuditEvents();
    } catch (e) {
      setError($('#audit-error'), e.message);
    } finally {
      btn.disabled = false;
    }
  }

  function renderAuditEvents() {
    const { userId, events } = state.audit;
    $('#audit-events-count').textContent = t('audit.eventsCount', { user: userId, n: events.length });
    let prev = 0;
    const rows = events.map((e) => {
      const hasBalance = e.balance_after !== null && e.balance_after !== undefined;
      const b = Number(e.balance_after);
      let delta = null;
      if (hasBalance && Number.isFinite(b)) { delta = b - prev; prev = b; }
      const payload = e.payload === undefined ? '' : JSON.stringify(e.payload);
      // Newest first in the table, as every list of the API.
      return el('tr', { 'data-testid': 'audit-event-row', 'data-event-type': e.event_type, 'data-balance-after': hasBalance ? String(b) : '' },
        el('td', { class: 'num' }, e.position ?? ''),
        el('td', { class: 'num' }, e.sequence ?? ''),
        el('td', { class: 'nowrap' }, fmtTime(e.recorded_at)),
        el('td', {}, el('code', {}, e.event_type || '')),
        el('td', { class: `num ${delta > 0 ? 'credits-plus' : delta < 0 ? 'credits-minus' : ''}` }, delta === null || delta === 0 ? '' : fmtSigned(delta)),
        el('td', { class: 'num', 'data-testid': 'audit-event-balance' }, hasBalance ? fmtInt(b) : '—'),
        el('td', { class: 'payload' }, el('code', { title: payload }, payload)));
    }).reverse();
    $('#audit-events-body').replaceChildren(...rows);
    drawChart($('#audit-chart'), balancePoints(events));
  }

  async function auditBalanceAt(ev) {
    ev.preventDefault();
    const userId = auditPreflight(true);
    if (!userId) return;
    const raw = $('#audit-balance-at').value;
    const at = raw ? new Date(raw) : new Date();
    const out = $('#audit-balance-result');
    if (Number.isNaN(at.getTime())) { setError(out, t('err.generic', { status: 400 })); return; }
    try {
      const data = await api(withQuery(`/api/admin/accounts/${encodeURIComponent(userId)}/balance`, { at: at.toISOString() }), { admin: true });
      const n = Array.isArray(data.events) ? data.events.length : 0;
      out.textContent = t('audit.balanceAtResult', { at: fmtTime(data.at || at.toISOString()), credits: fmtInt(Number(data.credits)), n });
      out.setAttribute('data-credits', String(data.credits));
      out.className = 'result';
      out.hidden = false;
    } catch (e) {
      out.className = 'result error';
      setError(out, e.message);
    }
  }

  async function auditAdjust(ev) {
    ev.preventDefault();
    const userId = auditPreflight(true);
    if (!userId) return;
    const out = $('#audit-adjust-result');
    out.className = 'result error';
    const raw = $('#audit-adjust-credits').value.trim();
    const credits = Number(raw);
    if (!/^[+-]?\d+$/.test(raw) || !Number.isSafeInteger(credits) || credits === 0) { setError(out, t('audit.adjustErrCredits')); return; }
    const reason = $('#audit-adjust-reason').value.trim();
    if (!reason) { setError(out, t('audit.adjustErrReason')); return; }
    const btn = $('#audit-adjust-submit');
    btn.disabled = true;
    try {
      await api(`/api/admin/accounts/${encodeURIComponent(userId)}/adjustments`, {
        method: 'POST', admin: true, body: { credits, reason }, headers: { 'Idempotency-Key': uuid() },
      });
      $('#audit-adjust-credits').value = '';
      $('#audit-adjust-reason').value = '';
      await loadAuditEvents();
      out.className = 'result success';
      setError(out, t('audit.adjustDone', { credits: fmtSigned(credits) }));
      if (userId === state.userId) refreshBalanceSoon();
    } catch (e) {
      setError(out, e.message);
    } finally {
      btn.disabled = false;
    }
  }

  function renderValue(v) {
    if (v === null || v === undefined) return '—';
    if (typeof v === 'number') return fmtInt(v);
    if (typeof v === 'object') return JSON.stringify(v);
    return String(v);
  }

  function keyValueList(obj, testid) {
    return el('dl', { class: 'kv', 'data-testid': testid },
      Object.entries(obj || {}).map(([k, v]) => [el('dt', {}, k), el('dd', {}, renderValue(v))]));
  }

  async function runAudit() {
    if (!auditPreflight(false)) return;
    const btn = $('#audit-run');
    const out = $('#audit-report');
    btn.disabled = true;
    try {
      const report = await api('/api/admin/audit', { admin: true });
      const ok = !!(report && report.ok === true);
      const discrepancies = Array.isArray(report.discrepancies) ? report.discrepancies : [];
      out.setAttribute('data-ok', ok ? 'true' : 'false');
      out.replaceChildren(
        el('p', { class: `audit-badge ${ok ? 'ok' : 'bad'}`, id: 'audit-ok-badge', 'data-testid': 'audit-ok-badge', 'data-ok': ok ? 'true' : 'false' },
          ok ? `✔ ${t('audit.ok')}` : `✘ ${t('audit.notOk')}`),
        el('div', { class: 'stat-row' },
          el('div', { class: 'stat' }, el('span', {}, t('audit.eventsChecked')), el('strong', { id: 'audit-events-checked', 'data-testid': 'audit-events-checked' }, renderValue(report.events_checked))),
          el('div', { class: 'stat' }, el('span', {}, t('audit.accountsChecked')), el('strong', { id: 'audit-accounts-checked', 'data-testid': 'audit-accounts-checked' }, renderValue(report.accounts_checked)))),
        el('h3', {}, t('audit.totals')),
        keyValueList(report.totals, 'audit-totals'),
        el('h3', {}, t('audit.discrepancies')),
        discrepancies.length === 0
          ? el('p', { class: 'hint', 'data-testid': 'audit-discrepancies' }, t('audit.noDiscrepancies'))
          : el('ol', { class: 'discrepancies', 'data-testid': 'audit-discrepancies' },
            discrepancies.map((d) => el('li', {}, typeof d === 'object' && d !== null ? keyValueList(d) : String(d)))),
        el('details', {}, el('summary', {}, t('audit.raw')), el('pre', { 'data-testid': 'audit-raw' }, JSON.stringify(report, null, 2))));
      out.hidden = false;
    } catch (e) {
      setError($('#audit-error'), e.message);
    } finally {
      btn.disabled = false;
    }
  }

  // ---------------------------------------------------------------------------------------
  // Start-up
  // ---------------------------------------------------------------------------------------
  function bind() {
    $('#lang-toggle').addEventListener('click', toggleLanguage);
    $('#btn-signout').addEventListener('click', () => signOut());
    $('#btn-recharge').addEventListener('click', openRecharge);
    $('#home-recharge').addEventListener('click', openRecharge);
    $('#insufficient-recharge').addEventListener('click', openRecharge);
    $('#recharge-close').addEventListener('click', closeRecharge);
    $('#recharge-backdrop').addEventListener('click', closeRecharge);
    document.addEventListener('keydown', (e) => { if (e.key === 'Escape' && !$('#recharge-modal').hidden) closeRecharge(); });
    for (const btn of $$('#quick-amounts .quick')) {
      btn.addEventListener('click', () => {
        $('#custom-amount').value = btn.getAttribute('data-amount');
        updateRechargePreview(true);
      });
    }
    $('#custom-amount').addEventListener('input', () => updateRechargePreview(false));
    $('#custom-amount').addEventListener('blur', () => { if ($('#custom-amount').value.trim()) updateRechargePreview(true); });
    $('#recharge-form').addEventListener('submit', submitRecharge);
    $('#recharge-result-close').addEventListener('click', () => { $('#recharge-result').hidden = true; });

    $('#dev-signin').addEventListener('submit', devSignIn);
    $('#signin-random').addEventListener('click', () => { $('#signin-user-id').value = uuid(); });
    $('#token-form').addEventListener('submit', tokenSignIn);

    $('#video-form').addEventListener('submit', submitVideo);
    $('#tasks-refresh').addEventListener('click', loadTasks);

    for (const b of $$('[data-tab]')) b.addEventListener('click', () => selectHistoryTab(b.getAttribute('data-tab')));
    $('#history-prev').addEventListener('click', () => {
      if (state.history.page > 0) { state.history.page -= 1; loadHistory(); }
    });
    $('#history-next').addEventListener('click', () => {
      const h = state.history;
      if (!h.next) return;
      h.cursors[h.page + 1] = h.next;
      h.cursors.length = h.page + 2;
      h.page += 1;
      loadHistory();
    });

    $('#chart-refresh').addEventListener('click', loadUserChart);
    for (const b of $$('[data-chart-mode]')) {
      b.addEventListener('click', () => {
        state.chartMode = b.getAttribute('data-chart-mode');
        renderChartMode();
        renderUserChart();
        if (state.audit.userId) drawChart($('#audit-chart'), balancePoints(state.audit.events));
      });
    }

    $('#admin-token-form').addEventListener('submit', saveAdminToken);
    $('#audit-account-form').addEventListener('submit', loadAuditEvents);
    $('#audit-use-mine').addEventListener('click', () => { $('#audit-user-id').value = state.userId || ''; });
    $('#audit-balance-form').addEventListener('submit', auditBalanceAt);
    $('#audit-adjust-form').addEventListener('submit', auditAdjust);
    $('#audit-run').addEventListener('click', runAudit);

    window.addEventListener('hashchange', route);
    let resizeTimer = null;
    window.addEventListener('resize', () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => {
        if (currentView() === 'chart') renderUserChart();
        if (currentView() === 'audit' && state.audit.userId) drawChart($('#audit-chart'), balancePoints(state.audit.events));
      }, 150);
    });
    document.addEventListener('visibilitychange', () => { if (!document.hidden) refreshBalance(); });
  }

  async function init() {
    const lang = localStorage.getItem(STORE.lang);
    state.lang = lang === 'en' ? 'en' : 'zh';
    state.adminToken = sessionStorage.getItem(STORE.admin) || '';
    state.token = localStorage.getItem(STORE.token);
    state.userId = state.token ? decodeJwtSub(state.token) : null;
    state.history = { tab: 'recharge', cursors: [null], page: 0, next: null, records: [] };
    bind();
    applyLanguage();
    renderChartMode();
    setSignedInChrome();
    handleRechargeReturn();
    if (state.token) {
      try {
        applyStats(await api('/api/stats'));
        startBalanceTimer();
      } catch (e) {
        if (e.status !== 401) toast(e.message, 'error');
      }
    }
    route();
    document.body.setAttribute('data-ready', 'true');
  }

  document.addEventListener('DOMContentLoaded', init);
})();
