# ruff: noqa: E501, RUF001 -- localized text: long lines and full-width punctuation are intended
"""Fixed replies in each supported language (written by the project): order actions and hand-off.

These are templates filled with facts from the order store, so an action's answer never depends on
the LLM and is exact in every language.
"""

from __future__ import annotations

from .store import OrderRecord

REPLIES: dict[str, dict[str, str]] = {
    "en": {
        "handoff": "I'm passing you to a member of our customer-service team. They will reply in this conversation shortly.",
        "handoff_unsure": "I'm not sure I have understood your question correctly, so I'm passing it to a colleague who will reply here shortly.",
        "handoff_angry": "I'm sorry for the trouble. I'm passing you to a member of our customer-service team right away.",
        "ask_order": "Please give me your order number (it looks like CB-100231) and I will check it for you.",
        "sign_in": "Please sign in so that I can look up your orders.",
        "not_found": "I couldn't find order {order_id} on your account. Please check the number.",
        "processing": "Order {order_id} is being prepared and will leave our warehouse soon. Estimated delivery: {eta}.",
        "shipped": "Order {order_id} is on its way with {carrier} (tracking number {tracking_number}). Estimated delivery: {eta}.",
        "delivered": "Order {order_id} was delivered on {delivered_date}.",
        "cancelled": "Order {order_id} was cancelled.",
        "return_started": "A return is open for order {order_id}.",
        "return_created": "I have started return {return_id} for order {order_id}. The return label is on its way to your e-mail; the refund follows within 5-10 business days after the parcel reaches us.",
        "return_exists": "A return ({return_id}) is already open for order {order_id}.",
        "return_not_delivered": "Order {order_id} has not been delivered yet, so a return cannot be started. You can start one once it arrives.",
    },
    "es": {
        "handoff": "Te paso con una persona de nuestro equipo de atención al cliente. Te responderá en esta conversación en breve.",
        "handoff_unsure": "No estoy seguro de haber entendido bien tu pregunta, así que se la paso a un compañero que te responderá aquí en breve.",
        "handoff_angry": "Siento mucho las molestias. Te paso ahora mismo con una persona de nuestro equipo de atención al cliente.",
        "ask_order": "Indícame tu número de pedido (tiene la forma CB-100231) y lo compruebo.",
        "sign_in": "Inicia sesión para que pueda consultar tus pedidos.",
        "not_found": "No he encontrado el pedido {order_id} en tu cuenta. Comprueba el número, por favor.",
        "processing": "El pedido {order_id} se está preparando y saldrá pronto de nuestro almacén. Entrega estimada: {eta}.",
        "shipped": "El pedido {order_id} está en camino con {carrier} (número de seguimiento {tracking_number}). Entrega estimada: {eta}.",
        "delivered": "El pedido {order_id} se entregó el {delivered_date}.",
        "cancelled": "El pedido {order_id} fue cancelado.",
        "return_started": "Hay una devolución abierta para el pedido {order_id}.",
        "return_created": "He iniciado la devolución {return_id} del pedido {order_id}. La etiqueta de devolución llegará a tu correo; el reembolso se hace en 5-10 días hábiles después de recibir el paquete.",
        "return_exists": "Ya hay una devolución abierta ({return_id}) para el pedido {order_id}.",
        "return_not_delivered": "El pedido {order_id} aún no se ha entregado, así que no se puede iniciar una devolución. Podrás hacerlo cuando llegue.",
    },
    "de": {
        "handoff": "Ich verbinde Sie mit einer Mitarbeiterin oder einem Mitarbeiter unseres Kundenservice. Sie erhalten in Kürze hier eine Antwort.",
        "handoff_unsure": "Ich bin nicht sicher, ob ich Ihre Frage richtig verstanden habe, und gebe sie an eine Kollegin oder einen Kollegen weiter, die Ihnen hier in Kürze antworten.",
        "handoff_angry": "Es tut mir leid für die Unannehmlichkeiten. Ich verbinde Sie sofort mit unserem Kundenservice.",
        "ask_order": "Bitte nennen Sie mir Ihre Bestellnummer (sie sieht aus wie CB-100231), dann prüfe ich das für Sie.",
        "sign_in": "Bitte melden Sie sich an, damit ich Ihre Bestellungen nachsehen kann.",
        "not_found": "Ich konnte die Bestellung {order_id} in Ihrem Konto nicht finden. Bitte prüfen Sie die Nummer.",
        "processing": "Die Bestellung {order_id} wird vorbereitet und verlässt bald unser Lager. Voraussichtliche Lieferung: {eta}.",
        "shipped": "Die Bestellung {order_id} ist mit {carrier} unterwegs (Sendungsnummer {tracking_number}). Voraussichtliche Lieferung: {eta}.",
        "delivered": "Die Bestellung {order_id} wurde am {delivered_date} zugestellt.",
        "cancelled": "Die Bestellung {order_id} wurde storniert.",
        "return_started": "Für die Bestellung {order_id} läuft eine Rücksendung.",
        "return_created": "Ich habe die Rücksendung {return_id} für die Bestellung {order_id} gestartet. Das Rücksendeetikett kommt per E-Mail; die Erstattung folgt 5-10 Werktage nach Eingang des Pakets.",
        "return_exists": "Für die Bestellung {order_id} läuft bereits eine Rücksendung ({return_id}).",
        "return_not_delivered": "Die Bestellung {order_id} ist noch nicht zugestellt, daher kann keine Rücksendung gestartet werden. Das geht, sobald sie angekommen ist.",
    },
    "fr": {
        "handoff": "Je vous mets en relation avec un membre de notre service client. Il vous répondra dans cette conversation très bientôt.",
        "handoff_unsure": "Je ne suis pas sûr d'avoir bien compris votre question ; je la transmets à un collègue qui vous répondra ici très bientôt.",
        "handoff_angry": "Je suis désolé pour ce désagrément. Je vous mets tout de suite en relation avec notre service client.",
        "ask_order": "Donnez-moi votre numéro de commande (il ressemble à CB-100231) et je vérifie pour vous.",
        "sign_in": "Veuillez vous connecter pour que je puisse consulter vos commandes.",
        "not_found": "Je n'ai pas trouvé la commande {order_id} sur votre compte. Veuillez vérifier le numéro.",
        "processing": "La commande {order_id} est en préparation et quittera bientôt notre entrepôt. Livraison estimée : {eta}.",
        "shipped": "La commande {order_id} est en route avec {carrier} (numéro de suivi {tracking_number}). Livraison estimée : {eta}.",
        "delivered": "La commande {order_id} a été livrée le {delivered_date}.",
        "cancelled": "La commande {order_id} a été annulée.",
        "return_started": "Un retour est en cours pour la commande {order_id}.",
        "return_created": "J'ai ouvert le retour {return_id} pour la commande {order_id}. L'étiquette de retour arrive par e-mail ; le remboursement suit sous 5 à 10 jours ouvrés après réception du colis.",
        "return_exists": "Un retour ({return_id}) est déjà ouvert pour la commande {order_id}.",
        "return_not_delivered": "La commande {order_id} n'a pas encore été livrée, un retour ne peut donc pas être ouvert. Vous pourrez le faire dès sa réception.",
    },
    "pt": {
        "handoff": "Vou transferir você para uma pessoa da nossa equipe de atendimento. Ela vai responder nesta conversa em breve.",
        "handoff_unsure": "Não tenho certeza de ter entendido sua pergunta, então vou passá-la a um colega que vai responder aqui em breve.",
        "handoff_angry": "Sinto muito pelo transtorno. Vou transferir você agora mesmo para a nossa equipe de atendimento.",
        "ask_order": "Informe o número do seu pedido (ele tem o formato CB-100231) que eu verifico para você.",
        "sign_in": "Faça login para que eu possa consultar seus pedidos.",
        "not_found": "Não encontrei o pedido {order_id} na sua conta. Confira o número, por favor.",
        "processing": "O pedido {order_id} está sendo preparado e sai do nosso armazém em breve. Entrega prevista: {eta}.",
        "shipped": "O pedido {order_id} está a caminho com a {carrier} (código de rastreio {tracking_number}). Entrega prevista: {eta}.",
        "delivered": "O pedido {order_id} foi entregue em {delivered_date}.",
        "cancelled": "O pedido {order_id} foi cancelado.",
        "return_started": "Há uma devolução aberta para o pedido {order_id}.",
        "return_created": "Abri a devolução {return_id} do pedido {order_id}. A etiqueta de devolução chegará por e-mail; o reembolso sai em 5 a 10 dias úteis após recebermos a encomenda.",
        "return_exists": "Já existe uma devolução aberta ({return_id}) para o pedido {order_id}.",
        "return_not_delivered": "O pedido {order_id} ainda não foi entregue, então não é possível abrir uma devolução. Você poderá fazer isso quando ele chegar.",
    },
    "zh": {
        "handoff": "我将为您转接人工客服，客服人员很快会在本对话中回复您。",
        "handoff_unsure": "我不确定是否正确理解了您的问题，已转交给同事处理，他们很快会在这里回复您。",
        "handoff_angry": "非常抱歉给您带来不便，我马上为您转接人工客服。",
        "ask_order": "请提供您的订单号（格式如 CB-100231），我来帮您查询。",
        "sign_in": "请先登录，我才能查询您的订单。",
        "not_found": "在您的账户中没有找到订单 {order_id}，请核对订单号。",
        "processing": "订单 {order_id} 正在备货，即将从仓库发出。预计送达：{eta}。",
        "shipped": "订单 {order_id} 已由 {carrier} 承运，运单号 {tracking_number}。预计送达：{eta}。",
        "delivered": "订单 {order_id} 已于 {delivered_date} 签收。",
        "cancelled": "订单 {order_id} 已取消。",
        "return_started": "订单 {order_id} 的退货正在处理中。",
        "return_created": "已为订单 {order_id} 创建退货申请 {return_id}。退货面单将发送到您的邮箱；我们收到包裹后5-10个工作日内退款。",
        "return_exists": "订单 {order_id} 已有一个进行中的退货申请（{return_id}）。",
        "return_not_delivered": "订单 {order_id} 尚未签收，暂时无法申请退货，签收后即可申请。",
    },
    "ja": {
        "handoff": "カスタマーサービスの担当者におつなぎします。まもなくこの会話でご返信いたします。",
        "handoff_unsure": "ご質問を正しく理解できているか自信がないため、担当者に引き継ぎます。まもなくこちらでご返信いたします。",
        "handoff_angry": "ご迷惑をおかけして申し訳ございません。すぐにカスタマーサービスの担当者におつなぎします。",
        "ask_order": "注文番号（CB-100231のような形式）をお知らせください。お調べいたします。",
        "sign_in": "ご注文を確認するため、ログインしてください。",
        "not_found": "お客様のアカウントで注文 {order_id} が見つかりませんでした。番号をご確認ください。",
        "processing": "注文 {order_id} は準備中で、まもなく倉庫から発送されます。お届け予定：{eta}。",
        "shipped": "注文 {order_id} は {carrier} で配送中です（追跡番号 {tracking_number}）。お届け予定：{eta}。",
        "delivered": "注文 {order_id} は {delivered_date} にお届け済みです。",
        "cancelled": "注文 {order_id} はキャンセルされました。",
        "return_started": "注文 {order_id} は返品手続き中です。",
        "return_created": "注文 {order_id} の返品 {return_id} を受け付けました。返送ラベルをメールでお送りします。商品到着後5～10営業日以内に返金いたします。",
        "return_exists": "注文 {order_id} にはすでに返品手続き（{return_id}）があります。",
        "return_not_delivered": "注文 {order_id} はまだお届けされていないため、返品を開始できません。お届け後に手続きしてください。",
    },
}


def reply(language: str, key: str, **facts: str) -> str:
    table = REPLIES.get(language, REPLIES["en"])
    return table[key].format(**facts)


def order_status_text(language: str, order: OrderRecord) -> str:
    key = order.status if order.status in REPLIES["en"] else "processing"
    return reply(
        language,
        key,
        order_id=order.order_id,
        eta=order.eta or "-",
        carrier=order.carrier or "-",
        tracking_number=order.tracking_number or "-",
        delivered_date=order.delivered_date or "-",
    )
