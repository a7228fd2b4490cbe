{{- define "saga.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "saga.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "saga.selectorLabels" -}}
app.kubernetes.io/name: {{ include "saga.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "saga.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "saga.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "saga.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "saga.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "saga.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
The Kafka settings every container of the chart gets: the nodes and the topics Job alike.
Names as in docs/configuration.md: SAGA_KAFKA__<KEY> is the librdkafka key <key>.
*/}}
{{- define "saga.kafkaEnv" -}}
- name: KAFKA_BOOTSTRAP_SERVERS
  value: {{ .Values.kafka.bootstrapServers | quote }}
- name: SAGA_NAMESPACE
  value: {{ .Values.kafka.namespace | quote }}
- name: SAGA_PARTITIONS
  value: {{ .Values.kafka.partitions | quote }}
- name: SAGA_KAFKA__SECURITY_PROTOCOL
  value: {{ .Values.kafka.securityProtocol | quote }}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol }}
{{- if not .Values.kafka.sasl.existingSecret }}
{{- fail "kafka.securityProtocol is SASL_*: set kafka.sasl.existingSecret (a Secret with the username and password)" }}
{{- end }}
- name: SAGA_KAFKA__SASL_MECHANISM
  value: {{ .Values.kafka.sasl.mechanism | quote }}
- name: SAGA_KAFKA__SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.existingSecret }}
      key: {{ .Values.kafka.sasl.usernameKey }}
{{- /* SAGA_KAFKA__SASL_PASSWORD: sasl.password beside sasl.username in the librdkafka settings,
     where the settings check them together (and mask the password, a secret key). */}}
- name: SAGA_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.existingSecret }}
      key: {{ .Values.kafka.sasl.passwordKey }}
{{- end }}
{{- if .Values.kafka.tls.existingSecret }}
{{- if .Values.kafka.tls.caKey }}
- name: SAGA_KAFKA__SSL_CA_LOCATION
  value: /etc/saga/tls/{{ .Values.kafka.tls.caKey }}
{{- end }}
{{- if and .Values.kafka.tls.certKey .Values.kafka.tls.keyKey }}
- name: SAGA_KAFKA__SSL_CERTIFICATE_LOCATION
  value: /etc/saga/tls/{{ .Values.kafka.tls.certKey }}
- name: SAGA_KAFKA__SSL_KEY_LOCATION
  value: /etc/saga/tls/{{ .Values.kafka.tls.keyKey }}
{{- end }}
{{- end }}
{{- range $key, $value := .Values.kafka.config }}
{{- /* A name with a dot is taken as the librdkafka key as written; Kubernetes allows it. */}}
- name: SAGA_KAFKA__{{ $key }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{- define "saga.tlsVolume" -}}
{{- if .Values.kafka.tls.existingSecret }}
- name: kafka-tls
  secret:
    secretName: {{ .Values.kafka.tls.existingSecret }}
{{- end }}
{{- end -}}

{{- define "saga.tlsMount" -}}
{{- if .Values.kafka.tls.existingSecret }}
- name: kafka-tls
  mountPath: /etc/saga/tls
  readOnly: true
{{- end }}
{{- end -}}
